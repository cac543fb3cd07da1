"""Cluster simulation driven by production traces (``p2pkv bench trace``): typed trace
records, simulated instances with KV tiers, the policies compared, and a fleet client that
keeps many simulated registrations alive on the real directory."""
