"""virtio-net: a device with queue pairs and a control queue, and the ports
its frames go to (a host tap, an in-process switch, a loopback, a generator),
with an optional pcap capture of every frame."""

from .device import EPILOG, NetDevice, format_mac, parse_mac
from .pcap import PcapRecord, PcapWriter, read_pcap
from .port import Generator, Loopback, Port, udp_frame
from .ring import NetStats, RxStatus
from .switch import Switch, SwitchPort
from .tap import Tap
from .wire import CtrlAck, CtrlClass, CtrlMac, CtrlMq, CtrlRx, GsoType, HeaderFlag, NetFeature

__all__ = [
    "EPILOG",
    "CtrlAck",
    "CtrlClass",
    "CtrlMac",
    "CtrlMq",
    "CtrlRx",
    "Generator",
    "GsoType",
    "HeaderFlag",
    "Loopback",
    "NetDevice",
    "NetFeature",
    "NetStats",
    "PcapRecord",
    "PcapWriter",
    "Port",
    "RxStatus",
    "Switch",
    "SwitchPort",
    "Tap",
    "format_mac",
    "parse_mac",
    "read_pcap",
    "udp_frame",
]
