"""What the scapy baselines do with a frame: the full dissection, reading what the agent reads
(transmitter, sequence number, signal, every element). Imports scapy only, so that a
whole-process scapy run (``python bench/scapy_dissect.py CAPTURE``) pays for nothing else.
"""

from __future__ import annotations

import sys

from scapy.all import Packet, PcapReader
from scapy.layers.dot11 import Dot11, Dot11Elt


def dissect(pkt: Packet) -> None:
    dot11 = pkt.getlayer(Dot11)
    if dot11 is not None and dot11.type == 0 and dot11.subtype == 4:
        _ = (dot11.addr2, dot11.SC, getattr(pkt, "dBm_AntSignal", None))
        elt = pkt.getlayer(Dot11Elt)
        while elt is not None:
            _ = (elt.ID, elt.info)
            elt = elt.payload.getlayer(Dot11Elt)


if __name__ == "__main__":
    n = 0
    for packet in PcapReader(sys.argv[1]):
        dissect(packet)
        n += 1
    print(n)
