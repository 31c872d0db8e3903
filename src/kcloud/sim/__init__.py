"""Fleet simulation: services on a mixed fleet over traces, with SLOs, power, cost and
domestic share; sizing; the 2025 / 2028 / 2030 roadmap. Every figure is modeled."""
