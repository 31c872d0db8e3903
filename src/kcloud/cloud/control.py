"""The control plane's core: tenants, keys, submit (plan, quota, placement), the reconcile loop.

Desired state lives in the database; `reconcile_once` observes what runs and makes it so, as
a Kubernetes controller does: a live deployment without a running engine gets one (a dead
engine is restarted with back-off), a deleted one is stopped and its devices released, one
whose devices vanished or were cordoned is re-planned onto what is free, and an engine left
behind by an earlier control plane is reaped. A restart of the control plane rebuilds the
fleet's holdings from the database and brings every live deployment back.

Submit refuses what cannot run, never leaving it pending: the planner plans on the fleet's free
devices within the tenant's remaining quota; a plan that fits the free fleet but not the quota
is refused with 403 naming the quota; one that fits nowhere with 422, the planner's reason and
the nearest request that would be admitted.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import yaml
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from kcloud.cloud import keys as keyring
from kcloud.cloud.db import (
    ApiKey,
    Audit,
    Cordon,
    Deployment,
    Tenant,
    Usage,
    database_url,
    now,
    open_db,
    today,
)
from kcloud.cloud.fleet import Alloc, Fleet, FleetDevice, plan_groups
from kcloud.cloud.sandbox import Sandbox, SandboxSpec, backend, limits_status, reap_orphan
from kcloud.errors import KCloudError
from kcloud.hardware.cluster import Cluster, cluster_from_dict, load_cluster, local_cpu_spec
from kcloud.planner import Goal, InfeasibleGoal, Plan, make_plan
from kcloud.planner.plan import Replica

log = logging.getLogger("kcloud.cloud")

DEFAULT_FLEET = "k-cloud-rack"
ENGINE_MEMORY_BYTES = 4 * 2**30
ENGINE_PIDS_MAX = 512
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class Refusal(Exception):
    """A request the control plane turns down: HTTP status, reason, and what would be admitted."""

    def __init__(self, status: int, reason: str, nearest: str | None = None,
                 field: str | None = None, quota: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.nearest = nearest
        self.field = field
        self.quota = quota

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"error": self.reason}
        for k in ("nearest", "field", "quota"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d


@dataclass(frozen=True)
class Principal:
    key_id: str
    role: str  # admin | tenant
    tenant_id: str | None

    @property
    def admin(self) -> bool:
        return self.role == "admin"


@dataclass
class Config:
    data_dir: Path
    database: str | None = None
    fleet: str = DEFAULT_FLEET
    local_cores: int | None = None  # local CPU cores as real devices (None: all, 0: none)
    isolation: str = "bwrap"
    model_roots: tuple[Path, ...] = ()  # where model files may live (besides DIR/models)
    reconcile_s: float = 1.0
    engine_memory_bytes: int | None = ENGINE_MEMORY_BYTES
    engine_pids_max: int | None = ENGINE_PIDS_MAX
    engine_argv: Any = None  # callable(deployment row, paths) -> argv; None: `kcloud serve`
    ready_timeout_s: float = 600.0


@dataclass
class Meter:
    requests: int = 0
    tokens: int = 0
    energy_j: float = 0.0


@dataclass
class Running:
    sandbox: Sandbox
    started: float
    ready: bool = False
    exit_code: int | None = None


@dataclass
class Engine:
    """What the reconcile loop knows about one deployment's engine."""

    run: Running | None = None
    failures: int = 0
    next_try: float = 0.0
    last_exit: int | None = None
    history: list[float] = field(default_factory=list)


class Control:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.dir = config.data_dir.resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        (self.dir / "deployments").mkdir(exist_ok=True)
        (self.dir / "models").mkdir(exist_ok=True)
        self.url = database_url(config.database, self.dir)
        self.engine, self.Session = open_db(self.url)
        self.backend = backend(config.isolation)
        problem = self.backend.problem()
        if problem:
            raise KCloudError(f"isolation {config.isolation} unavailable: {problem}",
                              "install it, or run unsandboxed with --isolation none")
        self.limits = limits_status()
        self.fleet = self._build_fleet()
        self.lock = threading.RLock()  # fleet holdings and submit
        self.engines: dict[str, Engine] = defaultdict(Engine)
        self.meters: dict[tuple[str, str], Meter] = defaultdict(Meter)  # (deployment, day)
        self.key_cache: dict[str, tuple[str, Principal, bool]] = {}
        self.quota_cache: dict[str, dict[str, Any]] = {}
        self._dir_fds: dict[str, int] = {}
        self.last_accrual = now()
        self.admin_key_path = self.dir / "admin.key"
        self.admin_key_created = self._ensure_admin_key()
        self._restore()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- set-up -------------------------------------------------------------------------------
    def _build_fleet(self) -> Fleet:
        parts: list[tuple[Cluster, bool]] = []
        if self.config.fleet:
            parts.append((load_cluster(self.config.fleet), False))
        cores = self.config.local_cores
        if cores is None or cores > 0:
            parts.append((cluster_from_dict(local_cpu_spec(cores), "local-cpu"), True))
        if not parts:
            raise KCloudError("the fleet is empty", "give --fleet or local cores")
        return Fleet(parts)

    def _ensure_admin_key(self) -> bool:
        with self.Session() as s:
            has = s.scalar(select(ApiKey.id).where(ApiKey.role == "admin",
                                                   ApiKey.revoked_at.is_(None)).limit(1))
            if has and self.admin_key_path.exists():
                return False
            k = keyring.make_key()
            s.add(ApiKey(id=k.id, tenant_id=None, role="admin", digest=k.digest,
                         created_at=now(), revoked_at=None))
            s.commit()
        fd = os.open(self.admin_key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(k.key + "\n")
        os.chmod(self.admin_key_path, 0o600)
        return True

    def _restore(self) -> None:
        """Rebuild the fleet's holdings and cordons from the database."""
        with self.Session() as s:
            for c in s.scalars(select(Cordon)):
                if c.device in self.fleet.devices:
                    self.fleet.devices[c.device].cordoned = True
            for d in s.scalars(select(Deployment).where(Deployment.state != "deleted")):
                ok = [Alloc.from_dict(a) for a in d.placement
                      if a["device"] in self.fleet.devices]
                self.fleet.hold(ok, d.id)
                if d.state in ("running", "restarting"):  # no engine runs yet: observe anew
                    d.state, d.reason, d.updated_at = "starting", "control plane restarted", now()
            s.commit()
        # engines left behind by a control plane that did not stop cleanly
        for root in (self.dir / "deployments").iterdir():
            if root.is_dir() and reap_orphan(root):
                log.info("reaped an orphaned engine in %s", root)

    # -- keys and principals ------------------------------------------------------------------
    def authenticate(self, key: str | None) -> Principal | None:
        if not key:
            return None
        kid = keyring.key_id(key)
        if kid is None:
            return None
        cached = self.key_cache.get(kid)
        if cached is None:
            with self.Session() as s:
                row = s.get(ApiKey, kid)
                if row is None:
                    return None
                cached = (row.digest, Principal(row.id, row.role, row.tenant_id),
                          row.revoked_at is not None)
            self.key_cache[kid] = cached
        digest, principal, revoked = cached
        if not keyring.matches(key, digest) or revoked:
            return None
        return principal

    def create_key(self, tenant_id: str) -> tuple[str, str]:
        with self.Session() as s:
            if s.get(Tenant, tenant_id) is None:
                raise Refusal(404, f"no tenant {tenant_id}")
            k = keyring.make_key()
            s.add(ApiKey(id=k.id, tenant_id=tenant_id, role="tenant", digest=k.digest,
                         created_at=now(), revoked_at=None))
            s.commit()
        return k.id, k.key

    def revoke_key(self, who: Principal, key_id: str) -> None:
        with self.Session() as s:
            row = s.get(ApiKey, key_id)
            if row is None or (not who.admin and row.tenant_id != who.tenant_id):
                raise Refusal(404, f"no key {key_id}")
            if row.revoked_at is None:
                row.revoked_at = now()
                s.commit()
        self.key_cache.pop(key_id, None)

    # -- tenants ------------------------------------------------------------------------------
    def create_tenant(self, name: str, quota: dict[str, Any]) -> dict[str, Any]:
        for dev in (quota.get("devices") or {}):
            if not any(d.type == dev or d.type.split(":")[0] == dev
                       for d in self.fleet.devices.values()):
                raise Refusal(422, f"quota.devices: no device '{dev}' in fleet {self.fleet.name}",
                              field=f"quota.devices.{dev}")
        with self.Session() as s:
            if s.scalar(select(Tenant.id).where(Tenant.name == name)):
                raise Refusal(409, f"a tenant named {name!r} exists", field="name")
            t = Tenant(id=keyring.new_id("t"), name=name, quota=quota, created_at=now())
            s.add(t)
            s.commit()
            return tenant_doc(t)

    def tenants(self) -> list[dict[str, Any]]:
        with self.Session() as s:
            return [tenant_doc(t) for t in s.scalars(select(Tenant).order_by(Tenant.created_at))]

    def tenant_quota(self, tenant_id: str | None) -> dict[str, Any]:
        if tenant_id is None:
            return {}
        q = self.quota_cache.get(tenant_id)
        if q is None:
            with self.Session() as s:
                t = s.get(Tenant, tenant_id)
                q = dict(t.quota) if t else {}
            self.quota_cache[tenant_id] = q
        return q

    def tenant(self, tenant_id: str) -> Tenant:
        with self.Session() as s:
            t = s.get(Tenant, tenant_id)
            if t is None:
                raise Refusal(404, f"no tenant {tenant_id}")
            return t

    # -- deployments --------------------------------------------------------------------------
    def check_model(self, model: str) -> str:
        from kcloud.graph import zoo

        if zoo.is_zoo_model(model):
            return model
        if ".py:" in model or model.endswith(".py"):
            # a model that is code would run in the control plane when it is planned: a tenant
            # sends data only (zoo names, Hugging Face directories, ONNX files)
            raise Refusal(422, f"model: {model!r} is Python code, which the control plane does "
                          "not run for a tenant", field="model",
                          nearest="a zoo model name, a Hugging Face model directory or an ONNX "
                          "file under the allowed model roots")
        path_part = model
        p = Path(path_part)
        roots = [self.dir / "models", *self.config.model_roots]
        try:
            real = (p if p.is_absolute() else self.dir / "models" / p).resolve()
        except (OSError, RuntimeError):
            real = None
        if real is None or not any(real.is_relative_to(r.resolve()) for r in roots):
            raise Refusal(422, f"model: {model!r} is neither a zoo model nor a path inside the "
                          f"allowed model roots", field="model",
                          nearest="a zoo model name (`kcloud graph --list`) or a file under "
                          f"{roots[0]}")
        if not real.exists():
            raise Refusal(422, f"model: no such file {model!r}", field="model")
        return str(real) + (model[len(path_part):] if path_part != model else "")

    def _held_equivalents(self, s: Session, tenant_id: str) -> dict[str, float]:
        held: dict[str, float] = defaultdict(float)
        ids = set(s.scalars(select(Deployment.id).where(Deployment.tenant_id == tenant_id,
                                                       Deployment.state != "deleted")))
        for d in self.fleet.devices.values():
            for u, h in d.held.values():
                if h in ids:
                    held[d.type.split(":")[0] if ":" not in d.type else d.type] += u / d.units
        return held

    def _quota_room(self, s: Session, tenant: Tenant) -> dict[str, float] | None:
        devices = tenant.quota.get("devices")
        if devices is None:
            return None
        held = self._held_equivalents(s, tenant.id)
        return {k: max(0.0, float(v) - held.get(k, 0.0)) for k, v in devices.items()}

    def _views(self, real: bool, room: dict[str, float] | None,
               max_devices: int | None = None) -> list[Cluster]:
        """The free fleet as the planner sees it: whole devices, and once per partition
        profile with the free devices of that type split into its instances."""
        out = []
        for profile in (None, *self.fleet.profiles(real)):
            c = self.fleet.free_cluster(real=real, name="fleet-free", allow=room,
                                        profile=profile, max_devices=max_devices)
            if c is not None:
                out.append(c)
        return out

    def _best(self, model: str, goal: Goal, views: list[Cluster]) -> Plan:
        """The best plan over the views by the goal's objective, then the fewest device
        equivalents; raises the whole-device view's InfeasibleGoal when none has one."""
        plans: list[Plan] = []
        first: KCloudError | None = None
        for c in views:
            try:
                plans.append(make_plan(model, c, goal).plan)
            except KCloudError as exc:
                first = first or exc
        if not plans:
            assert first is not None
            raise first
        return min(plans, key=lambda p: (_objective_key(p, goal.objective),
                                         self._equivalents(p)))

    def _equivalents(self, plan: Plan) -> float:
        return sum(self._share(st.device_type) * st.tp
                   for r in plan.replicas for st in r.stages)

    def _share(self, type_: str) -> float:
        base, _, part = type_.partition(":")
        if not part:
            return 1.0
        for d in self.fleet.devices.values():
            if d.type == type_:  # a catalog id that is itself a partition (host-cpu:1core)
                return 1.0
            if d.type == base:
                return d.profiles.get(part, d.units) / d.units
        return 1.0

    def _plan(self, model: str, goal: Goal, real: bool, room: dict[str, float] | None) -> Plan:
        """A plan on the free fleet within `room`, or a Refusal saying why not."""
        free_all = self._views(real, None, goal.max_devices)
        if not free_all:
            raise Refusal(422, f"no free {'real' if real else 'emulated'} devices in the fleet",
                          nearest="mode emulated" if real else
                          "fewer devices: wait for a deployment to end")
        inside: KCloudError | None = None
        free_q = free_all if room is None else self._views(real, room, goal.max_devices)
        if free_q:
            try:
                return self._best(model, goal, free_q)
            except KCloudError as exc:
                if room is None or not isinstance(exc, InfeasibleGoal):
                    raise Refusal(422, exc.problem, nearest=as_request(exc.hint)) from None
                inside = exc
        # not within the quota: would it fit the free fleet at all?
        try:
            wide = self._best(model, goal, free_all)
        except KCloudError as exc:
            raise Refusal(422, exc.problem, nearest=as_request(exc.hint)) from None
        assert room is not None
        need: dict[str, float] = defaultdict(float)
        for st in (st for r in wide.replicas for st in r.stages):
            fam = st.device_type if any(d.type == st.device_type
                                        for d in self.fleet.devices.values()) \
                else st.device_type.split(":")[0]
            need[fam] += self._share(st.device_type) * st.tp
        over = [(k, v) for k, v in need.items() if v > room.get(k, 0.0) + 1e-9]
        k, v = over[0] if over else next(iter(need.items()))
        raise Refusal(403, f"quota devices.{k}: this deployment needs {v:g} and the tenant has "
                      f"{room.get(k, 0.0):g} left", quota=f"devices.{k}",
                      nearest=as_request(inside.hint) if inside else None)

    def submit(self, who: Principal, req: dict[str, Any]) -> dict[str, Any]:
        if who.tenant_id is None:
            raise Refusal(403, "deployments belong to tenants: use a tenant key")
        model = self.check_model(req["model"])
        try:
            goal = goal_of(req)
        except KCloudError as exc:
            raise Refusal(422, exc.problem, nearest=as_request(exc.hint)) from None
        real = req.get("mode", "emulated") == "real"
        with self.lock, self.Session() as s:
            tenant = s.get(Tenant, who.tenant_id)
            assert tenant is not None
            q = tenant.quota
            live = s.scalars(select(Deployment).where(Deployment.tenant_id == tenant.id,
                                                      Deployment.live_name.is_not(None))).all()
            if any(d.name == req["name"] for d in live):
                raise Refusal(409, f"a deployment named {req['name']!r} exists", field="name")
            if q.get("max_deployments") is not None and len(live) >= q["max_deployments"]:
                raise Refusal(403, f"quota max_deployments: {len(live)} of "
                              f"{q['max_deployments']} in use", quota="max_deployments",
                              nearest="delete a deployment first")
            if q.get("device_hours_per_day") is not None:
                used = self.device_hours_today(s, tenant.id)
                if used >= q["device_hours_per_day"]:
                    raise Refusal(403, f"quota device_hours_per_day: {used:.3g} of "
                                  f"{q['device_hours_per_day']:g} used today",
                                  quota="device_hours_per_day")
            plan = self._plan(model, goal, real, self._quota_room(s, tenant))
            dep_id = keyring.new_id("d")
            groups = self.fleet.place(plan_groups(plan), dep_id, real=real)
            if groups is None:  # the plan was made on what is free, so this is a bug
                raise Refusal(422, "the plan's device groups could not be placed",
                              nearest="retry: the fleet changed")
            fleet_plan = self._fleet_plan(plan, groups)
            t = now()
            d = Deployment(id=dep_id, tenant_id=tenant.id, name=req["name"], model=model,
                           spec={k: req.get(k) for k in ("name", "model", "objective", "slo_ms",
                                                         "min_domestic_share", "mode",
                                                         "priority", "max_devices")},
                           desired="running", state="starting", reason="",
                           plan=fleet_plan.to_dict(),
                           placement=[a.to_dict() for g in groups for a in g],
                           restarts=0, priority=int(req.get("priority") or 0),
                           created_at=t, updated_at=t, live_name=req["name"])
            s.add(d)
            s.commit()
            return self.deployment_doc(d)

    def _fleet_plan(self, plan: Plan, groups: list[list[Alloc]]) -> Plan:
        """`plan` with its stages on the placed fleet devices (`device` or `device@offset`)."""
        it = iter(groups)
        reps = []
        for r in plan.replicas:
            stages = []
            for st in r.stages:
                g = next(it)
                stages.append(replace(st, devices=tuple(
                    a.device if a.partition is None else f"{a.device}@{a.offset}" for a in g)))
            reps.append(Replica(tuple(stages)))
        return replace(plan, replicas=tuple(reps), cluster=self.fleet.name)

    def engine_files(self, d: Deployment) -> tuple[Path, Path, Path]:
        """Write the deployment's cluster (its placed devices) and its plan on that cluster;
        (root, plan path, socket path)."""
        root = self.dir / "deployments" / d.id
        root.mkdir(exist_ok=True, mode=0o700)
        plan = Plan.from_dict(d.plan)
        nodes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        index: dict[tuple[str, str], int] = defaultdict(int)
        reps = []
        for r in plan.replicas:
            stages = []
            for st in r.stages:
                devs = []
                for ref in st.devices:
                    node = ref.split("/", 1)[0]
                    i = index[(node, st.device_type)]
                    index[(node, st.device_type)] += 1
                    nodes[node][st.device_type] += 1
                    devs.append(f"{node}/{st.device_type}/{i}")
                stages.append(replace(st, devices=tuple(devs)))
            reps.append(Replica(tuple(stages)))
        cluster_file = root / "cluster.yaml"
        links = self.fleet.node_links
        from kcloud.cloud.fleet import _link_spec

        assert self.fleet.network is not None
        cluster_file.write_text(yaml.safe_dump({
            "name": f"deployment-{d.id}",
            "network": _link_spec(self.fleet.network),
            "nodes": [{"name": n, "devices": dict(c), "link": _link_spec(links[n])}
                      for n, c in nodes.items()],
        }, sort_keys=False))
        plan_file = root / "plan.json"
        replace(plan, replicas=tuple(reps), cluster=str(cluster_file)).save(plan_file)
        return root, plan_file, root / "engine.sock"

    def _engine_argv(self, d: Deployment, plan_file: Path, sock: Path) -> list[str]:
        if self.config.engine_argv is not None:
            return list(self.config.engine_argv(d, plan_file, sock))
        return [sys.executable, "-m", "kcloud.cli", "serve", "--model", d.model,
                "--plan", str(plan_file), "--mode", d.spec.get("mode") or "emulated",
                "--served-name", d.name, "--uds", sock.name]  # cwd: its own directory

    def get(self, who: Principal, dep_id: str) -> Deployment:
        with self.Session() as s:
            d = s.get(Deployment, dep_id)
            if d is None or d.state == "deleted" or (not who.admin and
                                                     d.tenant_id != who.tenant_id):
                raise Refusal(404, f"no deployment {dep_id}")
            return d

    def list(self, who: Principal) -> list[Deployment]:
        with self.Session() as s:
            q = select(Deployment).where(Deployment.state != "deleted")
            if not who.admin:
                q = q.where(Deployment.tenant_id == who.tenant_id)
            return list(s.scalars(q.order_by(Deployment.created_at)))

    def delete(self, who: Principal, dep_id: str) -> Deployment:
        d = self.get(who, dep_id)
        with self.Session() as s:
            s.execute(update(Deployment).where(Deployment.id == d.id).values(
                desired="deleted", live_name=None, state="deleting", updated_at=now()))
            s.commit()
            d = s.get(Deployment, d.id)
            assert d is not None
        self.wake()
        return d

    def by_name(self, tenant_id: str, name: str) -> Deployment | None:
        with self.Session() as s:
            return s.scalar(select(Deployment).where(Deployment.tenant_id == tenant_id,
                                                     Deployment.live_name == name))

    def socket_of(self, d: Deployment) -> Path:
        return self.socket_of_id(d.id)

    def socket_of_id(self, dep_id: str) -> Path:
        return self.dir / "deployments" / dep_id / "engine.sock"

    def socket_address(self, dep_id: str) -> str:
        """The engine socket's path as a client connects to it: unix socket paths are limited
        to 107 bytes, so a longer one is reached through an O_PATH descriptor of its
        directory (`/proc/self/fd/N/engine.sock`)."""
        sock = self.dir / "deployments" / dep_id / "engine.sock"
        if len(str(sock)) < 100:
            return str(sock)
        fd = self._dir_fds.get(dep_id)
        if fd is None:
            fd = self._dir_fds[dep_id] = os.open(sock.parent, os.O_PATH | os.O_DIRECTORY)
        return f"/proc/self/fd/{fd}/{sock.name}"

    def _forget_socket(self, dep_id: str) -> None:
        fd = self._dir_fds.pop(dep_id, None)
        if fd is not None:
            os.close(fd)

    def deployment_doc(self, d: Deployment) -> dict[str, Any]:
        e = self.engines.get(d.id)
        return {"id": d.id, "name": d.name, "tenant_id": d.tenant_id, "model": d.model,
                "state": d.state, "reason": d.reason, "desired": d.desired,
                "mode": d.spec.get("mode") or "emulated", "objective": d.spec.get("objective"),
                "plan": d.plan, "placement": d.placement, "restarts": d.restarts,
                "created_at": d.created_at, "updated_at": d.updated_at,
                "engine_pid": e.run.sandbox.pid if e and e.run else None}

    # -- fleet --------------------------------------------------------------------------------
    def cordon(self, device: str, on: bool) -> None:
        if device not in self.fleet.devices:
            raise Refusal(404, f"no device {device}")
        with self.lock, self.Session() as s:
            row = s.get(Cordon, device)
            if on and row is None:
                s.add(Cordon(device=device, at=now()))
            if not on and row is not None:
                s.delete(row)
            s.commit()
            self.fleet.devices[device].cordoned = on
        self.wake()

    def fleet_doc(self) -> dict[str, Any]:
        with self.Session() as s:
            deps = {d.id: (d.name, d.tenant_id) for d in
                    s.scalars(select(Deployment).where(Deployment.state != "deleted"))}
            tnames = {t.id: t.name for t in s.scalars(select(Tenant))}
        names = {k: f"{tnames.get(t, t)}/{n}" for k, (n, t) in deps.items()}
        doc = self.fleet.to_dict(names)
        busy_w = idle_w = 0.0
        dom = used = 0.0
        for dev in self.fleet.devices.values():
            share = dev.used_units / dev.units
            p_idle = dev.device.idle_power_w.value
            p_max = dev.device.max_power_w.value
            # modeled: a held share draws as if busy, the rest idles
            busy_w += share * p_max + (1 - share) * p_idle
            idle_w += p_idle
            used += share
            dom += share if dev.device.domestic else 0.0
        for row in doc["devices"]:
            dev = self.fleet.devices[row["id"]]
            share = row["utilization"]
            row["power_w"] = share * dev.device.max_power_w.value + \
                (1 - share) * dev.device.idle_power_w.value
            row["tenants"] = sorted({deps[h["holder"]][1] for h in row["held"]
                                     if h["holder"] in deps})
        doc.update({"devices_total": len(self.fleet.devices), "devices_in_use": used,
                    "power_w": busy_w, "idle_power_w": idle_w, "power_figures": "modeled",
                    "domestic_share_in_use": dom / used if used else None,
                    "stranded_devices": self.fleet.stranded(), "isolation": self.backend.name,
                    "limits": self.limits})
        return doc

    # -- usage --------------------------------------------------------------------------------
    def meter(self, dep_id: str, requests: int = 0, tokens: int = 0,
              energy_j: float = 0.0) -> None:
        m = self.meters[(dep_id, today())]
        m.requests += requests
        m.tokens += tokens
        m.energy_j += energy_j

    def device_hours_today(self, s: Session, tenant_id: str) -> float:
        rows = s.scalars(select(Usage).where(Usage.tenant_id == tenant_id,
                                             Usage.day == today()))
        return sum(r.device_seconds for r in rows) / 3600

    def _accrue(self, s: Session, deps: list[Deployment]) -> None:
        """Flush the gateway's counters and add the device time of running deployments."""
        t = now()
        dt, self.last_accrual = t - self.last_accrual, t
        day = today(t)
        adds: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for (dep_id, dday), m in list(self.meters.items()):
            a = adds[(dep_id, dday)]
            a["requests"] += m.requests
            a["tokens"] += m.tokens
            a["energy_j"] += m.energy_j
            del self.meters[(dep_id, dday)]
        for d in deps:
            if d.state not in ("running", "starting", "restarting"):
                continue
            a = adds[(d.id, day)]
            for al in d.placement:
                dev = self.fleet.devices.get(al["device"])
                if dev is None:
                    continue
                share = al["units"] / dev.units
                a["device_seconds"] += share * dt
                a["energy_j"] += share * dev.device.idle_power_w.value * dt  # modeled idle
                price = dev.device.price_per_hour
                if price is not None:
                    a["cost_usd"] += share * price.value * dt / 3600
        tenant_of = {d.id: d.tenant_id for d in deps}
        for (dep_id, dday), a in adds.items():
            if not any(a.values()):
                continue
            tid = tenant_of.get(dep_id)
            if tid is None:
                row = s.get(Deployment, dep_id)
                if row is None:
                    continue
                tid = row.tenant_id
            u = s.scalar(select(Usage).where(Usage.deployment_id == dep_id, Usage.day == dday))
            if u is None:
                u = Usage(tenant_id=tid, deployment_id=dep_id, day=dday, requests=0, tokens=0,
                          device_seconds=0.0, energy_j=0.0, cost_usd=0.0)
                s.add(u)
            u.requests += int(a["requests"])
            u.tokens += int(a["tokens"])
            u.device_seconds += a["device_seconds"]
            u.energy_j += a["energy_j"]
            u.cost_usd += a["cost_usd"]
        s.commit()

    def usage(self, who: Principal) -> list[dict[str, Any]]:
        with self.Session() as s:
            q = select(Usage, Deployment.name).join(Deployment,
                                                    Deployment.id == Usage.deployment_id)
            if not who.admin:
                q = q.where(Usage.tenant_id == who.tenant_id)
            tnames = {t.id: t.name for t in s.scalars(select(Tenant))}
            return [{"tenant_id": u.tenant_id, "tenant": tnames.get(u.tenant_id),
                     "deployment_id": u.deployment_id, "deployment": name, "day": u.day,
                     "requests": u.requests, "tokens": u.tokens,
                     "device_seconds": u.device_seconds, "energy_j": u.energy_j,
                     "cost_usd": u.cost_usd}
                    for u, name in s.execute(q.order_by(Usage.day, Usage.deployment_id))]

    # -- audit --------------------------------------------------------------------------------
    def audit(self, who: Principal | None, action: str, target: str, status: int,
              detail: str = "") -> None:
        with self.Session() as s:
            s.add(Audit(at=now(), key_id=who.key_id if who else None,
                        tenant_id=who.tenant_id if who else None, action=action,
                        target=target[:512], status=status, detail=detail[:2000]))
            s.commit()

    def audit_log(self, limit: int = 200) -> list[dict[str, Any]]:
        with self.Session() as s:
            rows = s.scalars(select(Audit).order_by(Audit.id.desc()).limit(limit))
            return [{"id": a.id, "at": a.at, "key_id": a.key_id, "tenant_id": a.tenant_id,
                     "action": a.action, "target": a.target, "status": a.status,
                     "detail": a.detail} for a in rows]

    # -- reconcile ----------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kcloud-reconcile",
                                        daemon=True)
        self._thread.start()

    def wake(self) -> None:
        ev = getattr(self, "_wake", None)
        if ev is not None:
            ev.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile_once()
            except Exception:  # keep reconciling; the next pass retries
                log.exception("reconcile pass failed")
            self._wake.wait(self.config.reconcile_s)
            self._wake.clear()

    def shutdown(self) -> None:
        """Stop the loop and every engine (their desired state stays: a restart brings them
        back)."""
        self._stop.set()
        self.wake()
        if self._thread:
            self._thread.join(30)
        for e in self.engines.values():
            if e.run:
                e.run.sandbox.stop()
                e.run = None
        with self.Session() as s:
            self._accrue(s, list(s.scalars(select(Deployment).where(
                Deployment.state != "deleted"))))
        self.engine.dispose()

    def reconcile_once(self) -> None:
        with self.Session() as s:
            deps = list(s.scalars(select(Deployment).where(Deployment.state != "deleted")))
            for d in deps:
                try:
                    self._reconcile(s, d)
                except Exception as exc:
                    log.exception("reconcile of %s failed", d.id)
                    self._set(s, d, "failed", f"control plane error: {exc}")
            self._accrue(s, deps)
            live = {d.id for d in deps}
        for dep_id in [k for k in self.engines if k not in live]:
            e = self.engines.pop(dep_id)
            if e.run:
                e.run.sandbox.stop()

    def _set(self, s: Session, d: Deployment, state: str, reason: str = "") -> None:
        if d.state != state or d.reason != reason:
            d.state, d.reason, d.updated_at = state, reason, now()
            s.commit()

    def _reconcile(self, s: Session, d: Deployment) -> None:
        e = self.engines[d.id]
        if d.desired == "deleted":
            if e.run:
                e.run.sandbox.stop()
                e.run = None
            with self.lock:
                self.fleet.release(d.id)
            d.placement = []
            self._set(s, d, "deleted", "deleted by its tenant")
            self.engines.pop(d.id, None)
            self._forget_socket(d.id)
            root = self.dir / "deployments" / d.id
            shutil.rmtree(root, ignore_errors=True)
            return
        gone = [a["device"] for a in d.placement if a["device"] not in self.fleet.devices
                or self.fleet.devices[a["device"]].cordoned]
        if gone:
            self._replace(s, d, e, gone)
            return
        if d.state == "failed" and e.run is None and time.time() < e.next_try:
            return
        if e.run and not e.run.sandbox.alive():
            code = e.run.sandbox.stop(0)
            e.last_exit = code
            e.run = None
            e.failures += 1
            e.next_try = time.time() + min(30.0, 0.5 * 2 ** min(e.failures, 6))
            d.restarts += 1
            self._set(s, d, "restarting", f"engine exited with code {code}; restarting")
            return
        if e.run is None:
            if time.time() < e.next_try:
                return
            root, plan_file, sock = self.engine_files(d)
            reap_orphan(root)
            sock.unlink(missing_ok=True)
            env = self._engine_env(d, root)
            spec = SandboxSpec(
                name=d.id, root=root, argv=tuple(self._engine_argv(d, plan_file, sock)),
                env=env, hide=(self.dir,), memory_bytes=self.config.engine_memory_bytes,
                pids_max=self.config.engine_pids_max)
            e.run = Running(self.backend.start(spec), time.time())
            if d.state not in ("starting", "restarting"):
                self._set(s, d, "starting", d.reason)
            return
        if not e.run.ready:
            if self._probe(d.id):
                e.run.ready = True
                e.failures = 0
                self._set(s, d, "running", "")
            elif time.time() - e.run.started > self.config.ready_timeout_s:
                e.run.sandbox.stop()
                e.run = None
                e.failures += 1
                e.next_try = time.time() + 30
                self._set(s, d, "failed", f"engine not ready after "
                          f"{self.config.ready_timeout_s:g} s; retrying")
        elif d.state != "running":
            self._set(s, d, "running", "")

    def _engine_env(self, d: Deployment, root: Path) -> dict[str, str]:
        visible = ",".join(a["device"] + (f"@{a['offset']}" if a.get("partition") else "")
                           for a in d.placement)
        real_cores = sum(1 for a in d.placement if self.fleet.devices[a["device"]].real)
        threads = str(max(1, real_cores))
        from kcloud.hardware.host import cache_dir

        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root),
               "KCLOUD_VISIBLE_DEVICES": visible, "KCLOUD_DEPLOYMENT": d.id,
               "KCLOUD_CACHE_DIR": str(cache_dir()), "OMP_NUM_THREADS": threads,
               "PYTHONUNBUFFERED": "1", "TMPDIR": "/tmp"}
        for k in ("KCLOUD_CATALOG_PATH", "VIRTUAL_ENV", "LANG"):
            if k in os.environ:
                env[k] = os.environ[k]
        return env

    def _probe(self, dep_id: str) -> bool:
        if not self.socket_of_id(dep_id).exists():
            return False
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=self.socket_address(dep_id)),
                              timeout=2.0) as c:
                return c.get("http://engine/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def _replace(self, s: Session, d: Deployment, e: Engine, gone: list[str]) -> None:
        """Re-plan a deployment whose devices vanished onto what is free."""
        if e.run:
            e.run.sandbox.stop()
            e.run = None
        with self.lock:
            self.fleet.release(d.id)
            tenant = s.get(Tenant, d.tenant_id)
            assert tenant is not None
            spec = d.spec
            goal = goal_of(spec)
            real = spec.get("mode") == "real"
            try:
                plan = self._plan(d.model, goal, real, self._quota_room(s, tenant))
            except Refusal as r:
                d.placement = []
                self._set(s, d, "failed", f"devices {', '.join(gone)} gone; re-plan refused: "
                          f"{r.reason}")
                return
            groups = self.fleet.place(plan_groups(plan), d.id, real=real)
            if groups is None:
                self._set(s, d, "failed", "re-placement failed")
                return
            d.plan = self._fleet_plan(plan, groups).to_dict()
            d.placement = [a.to_dict() for g in groups for a in g]
            d.restarts += 1
            self._set(s, d, "replacing", f"devices {', '.join(gone)} gone; re-placed on "
                      f"{len(d.placement)} free device(s)")


_FLAGS = {"--slo-ms": "slo_ms", "--max-devices": "max_devices",
          "--min-domestic-share": "min_domestic_share", "--objective": "objective"}


def as_request(hint: str | None) -> str | None:
    """The planner's hint (in CLI flags) in the request's field names."""
    if hint is None:
        return None
    for flag, name in _FLAGS.items():
        hint = hint.replace(f"give {flag} ", f"{name}: ").replace(flag, name)
    return hint


def goal_of(req: dict[str, Any]) -> Goal:
    return Goal(objective=req.get("objective") or "throughput",
                slo_s=req["slo_ms"] / 1e3 if req.get("slo_ms") else None,
                min_domestic_share=req.get("min_domestic_share") or 0.0,
                max_devices=req.get("max_devices") or 1)


def _objective_key(p: Plan, objective: str) -> float:
    m = p.predicted
    if objective == "latency":
        return m.latency_s
    if objective == "throughput":
        return -m.throughput
    if objective == "energy":
        return m.energy_per_item_j
    return m.cost_per_item_usd if m.cost_per_item_usd is not None else math.inf


def tenant_doc(t: Tenant) -> dict[str, Any]:
    return {"id": t.id, "name": t.name, "quota": t.quota, "created_at": t.created_at}


def devices_of(plan: dict[str, Any]) -> int:
    return sum(len(st["devices"]) for r in plan["replicas"] for st in r["stages"])


def modeled_energy(plan: dict[str, Any], items: int) -> float:
    """Modeled joules of `items` (tokens or samples) at the plan's modeled energy per item."""
    e = plan.get("predicted", {}).get("energy_per_item_j") or 0.0
    return float(e) * items if math.isfinite(float(e)) else 0.0


__all__ = ["Config", "Control", "FleetDevice", "Principal", "Refusal"]
