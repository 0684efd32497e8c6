"""Process limits the benchmarks share (bench.py, udp_bench.py)."""
import resource


def raise_nofile(needed=None):
    """Raise the soft RLIMIT_NOFILE towards NEEDED descriptors (all the hard limit when None); return it.

    Children inherit it. The hard limit is not raised: that needs
    CAP_SYS_RESOURCE in the initial user namespace, which a container's root
    may lack. A soft limit already high enough is left as it is.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if needed is None or hard != resource.RLIM_INFINITY and needed > hard else needed
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    return soft
