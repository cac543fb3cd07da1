"""Cluster launchers: the plan (what runs where), the per-node runner, `p2pkv launch`."""
