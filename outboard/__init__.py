"""outboard: out-of-process virtio device back-ends (vhost-user, vfio-user)."""

__version__ = "0.1.0"
