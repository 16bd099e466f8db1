"""Transports that carry a device to a VMM: vhost-user (and vfio-user)."""
