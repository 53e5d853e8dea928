"""Counter stores: in-memory (one replica) and Redis (single, Cluster, Sentinel)."""
