"""A plain-Python twin of the parse stage, written from the formats' specifications.

:func:`reference_parse` takes one captured frame and returns the row the parse stage must
produce for it (:class:`Row`, the fields of a ``ProbeBatch`` row) or ``None`` where it keeps
no row. It is deliberately slow and obvious: ``struct`` over ``bytes``, one function per
header format, each written from that format's own description rather than from the numba
code, so that the two can be held against each other.

Sources, per format:

* radiotap: https://www.radiotap.org (header, extended presence bitmaps, namespaces, field
  alignment relative to the header start) and its reference parser, radiotap-library, for
  the sizes and alignments of fields 0..22 (FHSS: alignment 2, which radiotap.org leaves
  unstated and every parser agrees on).
* Prism: the wlan-ng capture header as libpcap, tcpdump and Wireshark read it: a msgcode
  (0x44, or 0x41 from other drivers) in host byte order, which tells the byte order; a
  message length; 12-byte items ``did, status, len, data`` matched by their exact DID
  (channel 0x00030044 / 0x00003041, RSSI in dBm 0x00040044 / 0x00004041), used only when
  their status is 0. A frame of link type 119 that starts with an AVS magic number
  (0x80211001 / 0x80211002) carries an AVS header instead (Linux drivers did this).
* AVS (wlancap): a big-endian header whose second word is its length; the channel at
  offset 28; ``ssi_type`` at 44 (2 means dBm) and ``ssi_signal`` at 48.
* PPI (CACE PPI 1.0): an 8-byte header (version 0, flags, length, DLT) then
  type/length fields, padded to 32 bits after each field when flag bit 0 is set. The
  802.11-Common field (type 2) is exactly 20 bytes: TSF timer, flags (bit 0 FCS present,
  bit 2 FCS invalid), rate, channel frequency, channel flags, FHSS hop set and pattern,
  then the dBm antenna signal (-128 means none) and noise.
* 802.11: frame control, duration, addr1, addr2 (the transmitter), addr3, sequence control,
  and an HT Control field when a management frame has its Order bit set; then the
  information elements, checked against the length rules the parse stage documents.
* Rows: the parse stage's module docstring (kinds, which frames keep a row, which elements
  and bytes the fingerprint covers). The digest itself is not specified there; its steps
  are those ``_mix`` in parse.py documents (``h = (h ^ word) * P; h ^= h >> 32`` from the
  FNV-1a offset basis and prime) over the element ID and length, then the covered bytes as
  8-byte little-endian words. A 32-bit signal that an int16 row cannot hold is missing.
* Channel numbers to MHz: IEEE 802.11 Annex E as Linux and Wireshark apply it when no band
  is given: 1..13 and 14 in 2.4 GHz, 182..196 in the 4.9 GHz band (4000 + 5n), other
  channels from 32 in 5 GHz (5000 + 5n).

Where these sources and ``firmware_agent/stages/parse.py`` disagree the sources decide here, and
``tests/agent/test_parse.py`` names each disagreement in a test of its own.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

__all__ = [
    "FP_SEED",
    "KIND_FCS_BAD",
    "KIND_MALFORMED",
    "KIND_NO_SA",
    "KIND_PROBE",
    "RSSI_MISSING",
    "SSID_DIRECTED",
    "SSID_NONE",
    "SSID_WILDCARD",
    "Radio",
    "Row",
    "channel_to_mhz",
    "elements_fingerprint",
    "fingerprint_digest",
    "radio_header",
    "reference_parse",
]

# The row vocabulary of the parse stage's module docstring (kept literal here on purpose).
KIND_PROBE = 1
KIND_MALFORMED = 2
KIND_FCS_BAD = 4
KIND_NO_SA = 8
SSID_NONE = 0
SSID_WILDCARD = 1
SSID_DIRECTED = 2
RSSI_MISSING = -32768

LINKTYPE_IEEE802_11 = 105
LINKTYPE_PRISM = 119
LINKTYPE_RADIOTAP = 127
LINKTYPE_AVS = 163
LINKTYPE_PPI = 192

FP_SEED = 0xCBF29CE484222325
FP_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1

# radiotap namespace, from radiotap-library: bit -> (alignment, size). Only fields 0..5 are
# ever needed (they precede antenna signal); the rest lets tests build realistic headers.
RADIOTAP_FIELDS: dict[int, tuple[int, int]] = {
    0: (8, 8),  # TSFT
    1: (1, 1),  # Flags
    2: (1, 1),  # Rate
    3: (2, 4),  # Channel: u16 frequency, u16 flags
    4: (2, 2),  # FHSS: u8 hop set, u8 hop pattern
    5: (1, 1),  # dBm antenna signal (s8)
    6: (1, 1),  # dBm antenna noise
    7: (2, 2),  # lock quality
    8: (2, 2),  # TX attenuation
    9: (2, 2),  # dB TX attenuation
    10: (1, 1),  # dBm TX power
    11: (1, 1),  # antenna
    12: (1, 1),  # dB antenna signal
    13: (1, 1),  # dB antenna noise
    14: (2, 2),  # RX flags
    15: (2, 2),  # TX flags
    16: (1, 1),  # RTS retries
    17: (1, 1),  # data retries
    18: (4, 8),  # XChannel (not in the defined set; widely emitted)
    19: (1, 3),  # MCS
    20: (4, 8),  # A-MPDU status
    21: (2, 12),  # VHT
    22: (8, 12),  # timestamp
}
RT_TSFT, RT_FLAGS, RT_RATE, RT_CHANNEL, RT_FHSS, RT_DBM_ANTSIGNAL = range(6)
RT_FLAG_FCS_AT_END = 0x10
RT_FLAG_FAILED_FCS = 0x40
RT_EXT = 1 << 31

PRISM_MSGCODES = (0x00000044, 0x00000041)
PRISM_CHANNEL_DIDS = (0x00030044, 0x00003041)
PRISM_RSSI_DIDS = (0x00040044, 0x00004041)
AVS_MAGICS = (0x80211001, 0x80211002)
AVS_SSI_DBM = 2

PPI_FLAG_ALIGNED = 0x01
PPI_80211_COMMON = 2
PPI_80211_COMMON_LEN = 20
PPI_COMMON_FCS_PRESENT = 0x0001
PPI_COMMON_FCS_INVALID = 0x0004
PPI_DBM_NONE = -128

# 802.11
FC_PROBE_REQUEST = 0x40  # protocol version 0, type 0 (management), subtype 4
FC1_ORDER = 0x80
ADDR2 = slice(10, 16)
MGMT_HEADER = 24
HT_CONTROL = 4
FCS_LEN = 4

EID_SSID = 0
EID_DS_PARAMS = 3
EID_VENDOR = 221
EID_EXTENSION = 255
FP_WHOLE_BODY = frozenset({1, 45, 50, 127, 191})  # rates, HT, ext rates, ext caps, VHT
FP_EXTENSIONS = frozenset({35, 108})  # HE capabilities, EHT capabilities
VENDOR_OUI_AND_TYPE = 4


@dataclass(frozen=True, slots=True)
class Row:
    """One ProbeBatch row."""

    kind: int
    ts_ns: int
    mac: bytes
    seq: int
    rssi: int
    freq_mhz: int
    ssid: int
    fp: int


@dataclass(frozen=True, slots=True)
class Radio:
    """What a radio header says: its length, FCS flags, signal (dBm) and frequency (MHz)."""

    length: int
    fcs_at_end: bool = False
    fcs_failed: bool = False
    rssi: int = RSSI_MISSING
    freq_mhz: int = 0


def channel_to_mhz(channel: int) -> int:
    """Centre frequency of a channel number given without a band (0 when not a channel)."""
    if 1 <= channel <= 13:
        return 2407 + 5 * channel
    if channel == 14:
        return 2484
    if 182 <= channel <= 196:
        return 4000 + 5 * channel
    if 32 <= channel <= 181:
        return 5000 + 5 * channel
    return 0


def _dbm(value: int) -> int:
    """A signal in dBm as a row holds it (int16): out of range means there is none."""
    return value if -32767 <= value <= 32767 else RSSI_MISSING


def radiotap(frame: bytes) -> Radio | None:
    """The radiotap header at the start of frame, or None if it cannot be read."""
    if len(frame) < 8:
        return None
    version, _pad, it_len = struct.unpack_from("<BBH", frame, 0)
    if version != 0 or it_len < 8 or it_len > len(frame):
        return None
    header = frame[:it_len]
    # Presence words: each one with bit 31 set is followed by another. Only the first word's
    # fields matter; they are in the radiotap namespace and their data comes first.
    words: list[int] = []
    offset = 4
    while not words or words[-1] & RT_EXT:
        if offset + 4 > len(header):
            return None
        words.append(struct.unpack_from("<I", header, offset)[0])
        offset += 4
    present = words[0]
    values: dict[int, bytes] = {}
    for bit in range(RT_DBM_ANTSIGNAL + 1):
        if not present & (1 << bit):
            continue
        align, size = RADIOTAP_FIELDS[bit]
        offset += -offset % align
        if offset + size > len(header):
            return None
        values[bit] = header[offset : offset + size]
        offset += size
    flags = values[RT_FLAGS][0] if RT_FLAGS in values else 0
    freq = struct.unpack("<HH", values[RT_CHANNEL])[0] if RT_CHANNEL in values else 0
    rssi = struct.unpack("<b", values[RT_DBM_ANTSIGNAL])[0] if RT_DBM_ANTSIGNAL in values else None
    return Radio(
        length=it_len,
        fcs_at_end=bool(flags & RT_FLAG_FCS_AT_END),
        fcs_failed=bool(flags & RT_FLAG_FAILED_FCS),
        rssi=RSSI_MISSING if rssi is None else rssi,
        freq_mhz=freq,
    )


def prism(frame: bytes) -> Radio | None:
    """The Prism (or, by its magic, AVS) header at the start of frame, or None."""
    if len(frame) >= 4 and struct.unpack_from(">I", frame)[0] in AVS_MAGICS:
        return avs(frame)
    if len(frame) < 8:
        return None
    for order in ("<", ">"):
        if struct.unpack_from(order + "I", frame)[0] in PRISM_MSGCODES:
            break
    else:
        return None
    msglen = struct.unpack_from(order + "I", frame, 4)[0]
    if msglen < 24 or msglen > len(frame):
        return None
    rssi, freq = RSSI_MISSING, 0
    for item in range(24, msglen - 11, 12):
        did, status, _length, data = struct.unpack_from(order + "IHHI", frame, item)
        if status != 0:
            continue
        if did in PRISM_CHANNEL_DIDS:
            freq = channel_to_mhz(data)
        elif did in PRISM_RSSI_DIDS:
            rssi = _dbm(data - (1 << 32) if data >= 1 << 31 else data)
    return Radio(length=msglen, rssi=rssi, freq_mhz=freq)


def avs(frame: bytes) -> Radio | None:
    """The AVS (wlancap) header at the start of frame, or None."""
    if len(frame) < 64:
        return None
    length = struct.unpack_from(">I", frame, 4)[0]
    if length < 64 or length > len(frame):
        return None
    (channel,) = struct.unpack_from(">I", frame, 28)
    ssi_type, ssi_signal = struct.unpack_from(">Ii", frame, 44)
    rssi = _dbm(ssi_signal) if ssi_type == AVS_SSI_DBM else RSSI_MISSING
    return Radio(length=length, rssi=rssi, freq_mhz=channel_to_mhz(channel))


def ppi(frame: bytes) -> Radio | None:
    """The PPI header at the start of frame (802.11 inside), or None."""
    if len(frame) < 8:
        return None
    version, flags, length, dlt = struct.unpack_from("<BBHI", frame)
    if version != 0 or length < 8 or length > len(frame) or dlt != LINKTYPE_IEEE802_11:
        return None
    radio = Radio(length=length)
    offset = 8
    while offset + 4 <= length:
        ftype, flen = struct.unpack_from("<HH", frame, offset)
        data = offset + 4
        if data + flen > length:
            return None
        if ftype == PPI_80211_COMMON and flen == PPI_80211_COMMON_LEN:
            _tsft, cflags, _rate, freq, _chflags, _hop_set, _hop_pattern, signal, _noise = (
                struct.unpack_from("<QHHHHBBbb", frame, data)
            )
            radio = Radio(
                length=length,
                fcs_at_end=bool(cflags & PPI_COMMON_FCS_PRESENT),
                fcs_failed=bool(cflags & PPI_COMMON_FCS_INVALID),
                rssi=RSSI_MISSING if signal == PPI_DBM_NONE else signal,
                freq_mhz=freq,
            )
        offset = data + flen
        if flags & PPI_FLAG_ALIGNED:
            offset += -offset % 4
    return radio


def radio_header(frame: bytes, link_type: int) -> Radio | None:
    """The radio header of a frame of this link type (length 0 for bare 802.11), or None."""
    if link_type == LINKTYPE_IEEE802_11:
        return Radio(length=0)
    if link_type == LINKTYPE_RADIOTAP:
        return radiotap(frame)
    if link_type == LINKTYPE_PRISM:
        return prism(frame)
    if link_type == LINKTYPE_AVS:
        return avs(frame)
    if link_type == LINKTYPE_PPI:
        return ppi(frame)
    return None


_EXACT_LENGTHS = {3: 1, 45: 26, 191: 12, 72: 1, 74: 14}  # DS, HT, VHT, 20/40, OBSS scan


def _element_length_ok(eid: int, length: int) -> bool:
    """The element length rules the parse stage documents (IEEE 802.11-2020)."""
    if eid in (1, 50, 127):  # rates, extended rates, extended capabilities
        return length >= 1
    if eid in (221, 150):  # vendor specific: an OUI at least
        return length >= 3
    return _EXACT_LENGTHS.get(eid, length) == length


@functools.lru_cache(maxsize=1 << 16)  # a device sends the same elements in every probe
def elements_fingerprint(body: bytes) -> tuple[bool, int, int]:
    """(well formed, SSID kind, fingerprint) of an information element list.

    The SSID kind is that of the first SSID element, and stays what was seen before a
    malformed element. The fingerprint hashes, for every element but SSID and DS parameter
    set, its ID, the number of content bytes covered and those bytes: the whole body of
    rates, extended rates, HT, VHT, extended capabilities and (extension elements) HE and EHT
    capabilities; a vendor element's OUI and type; nothing of any other element. It is 0
    when the list is malformed.
    """
    elements: list[tuple[int, bytes]] = []
    ssid = SSID_NONE
    well_formed = True
    at = 0
    while at < len(body):
        if at + 2 > len(body):
            well_formed = False
            break
        eid, length = body[at], body[at + 1]
        content = body[at + 2 : at + 2 + length]
        if len(content) < length or not _element_length_ok(eid, length):
            well_formed = False
            break
        if eid == EID_SSID and ssid == SSID_NONE:
            ssid = SSID_DIRECTED if length else SSID_WILDCARD
        elements.append((eid, content))
        at += 2 + length
    if not well_formed:
        return False, ssid, 0
    covered: list[tuple[int, bytes]] = []
    for eid, content in elements:
        if eid in (EID_SSID, EID_DS_PARAMS):
            continue
        if eid in FP_WHOLE_BODY:
            covered.append((eid, content))
        elif eid == EID_VENDOR:
            covered.append((eid, content[:VENDOR_OUI_AND_TYPE]))
        elif eid == EID_EXTENSION and content[:1] and content[0] in FP_EXTENSIONS:
            covered.append((eid, content))
        else:
            covered.append((eid, b""))
    return True, ssid, fingerprint_digest(tuple(covered))


def fingerprint_digest(covered: tuple[tuple[int, bytes], ...]) -> int:
    """The 64-bit digest of (element ID, covered bytes) pairs, in element order.

    Each step is ``h = (h ^ word) * P mod 2**64; h ^= h >> 32`` from ``FP_SEED``: one step
    for ``eid | len(covered) << 8``, then one per 8 covered bytes read as a little-endian
    word (the last word shorter).
    """
    digest = FP_SEED
    for eid, data in covered:
        words = [eid | len(data) << 8]
        words += [int.from_bytes(data[at : at + 8], "little") for at in range(0, len(data), 8)]
        for word in words:
            digest = ((digest ^ word) * FP_PRIME) & _MASK64
            digest ^= digest >> 32
    return digest


def reference_parse(frame: bytes, link_type: int, ts_ns: int) -> Row | None:
    """The row the parse stage keeps for one captured frame, or None where it keeps none."""
    radio = radio_header(frame, link_type)
    rssi = RSSI_MISSING if radio is None else radio.rssi
    freq = 0 if radio is None else radio.freq_mhz

    def row(kind: int, mac: bytes = bytes(6), seq: int = 0, ssid: int = 0, fp: int = 0) -> Row:
        return Row(kind, ts_ns, mac, seq, rssi, freq, ssid, fp)

    if radio is None or radio.length >= len(frame):
        return row(KIND_MALFORMED)  # nobody can tell what this frame is
    mpdu = frame[radio.length :]
    if mpdu[0] != FC_PROBE_REQUEST:
        return None
    kind = KIND_PROBE | (KIND_FCS_BAD if radio.fcs_failed else 0)
    if radio.fcs_at_end:
        mpdu = mpdu[:-FCS_LEN]
    header = MGMT_HEADER + (HT_CONTROL if len(mpdu) >= 2 and mpdu[1] & FC1_ORDER else 0)
    if len(mpdu) < ADDR2.stop:
        return row(kind | KIND_MALFORMED | KIND_NO_SA)
    mac = mpdu[ADDR2]
    if len(mpdu) < header:
        return row(kind | KIND_MALFORMED, mac)
    seq = struct.unpack_from("<H", mpdu, 22)[0] >> 4
    well_formed, ssid, fp = elements_fingerprint(mpdu[header:])
    return row(kind if well_formed else kind | KIND_MALFORMED, mac, seq, ssid, fp)
