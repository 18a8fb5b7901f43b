"""lessserve.cluster: the Ray Serve application: router, session-affine workers, the session
directory, cluster state and metrics, configuration and launch."""
