"""A PCI function in software: config space, BARs, MSI-X, INTx, virtio-pci."""
