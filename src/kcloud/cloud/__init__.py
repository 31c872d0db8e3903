"""The K-Cloud control plane: one fleet, many tenants.

Tenants deploy models under quotas and reach them with API keys through the gateway. State lives
in a database (SQLAlchemy 2, Alembic migrations; SQLite by default, PostgreSQL by URL): the
database holds what should be, the reconcile loop (`kcloud.cloud.control`) makes it so. Modules:

- `db`: the schema and the engine (`open_db`), migrated to head on open;
- `keys`: API keys, stored as hashes and compared in constant time;
- `fleet`: the fleet's devices as partition trees and the placer (best-fit, node locality);
- `sandbox`: engine sandboxes (bubblewrap, runc, none) behind one small interface;
- `control`: submit (plan, quota, placement), the reconcile loop, usage metering;
- `api`, `gateway`, `console`: the REST API, the `/v1/*` gateway and the web console.
"""
