"""sap_cluster: provider replicas on a Ray cluster behind one router (sap-cluster).

router.py    the router: one address, each session pinned to its replica, moved to a live one when its replica
             dies (the session table, the pass-through of sap.v2 calls)
replicas.py  the replicas: a full sap-server in each Ray actor, started again by Ray when its process dies
cli.py       sap-cluster: start or join Ray, start the replicas, serve the router
"""
