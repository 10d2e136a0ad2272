"""Parse stage: raw frames in, one row per probe request out (numba).

:func:`parse_batch` walks a :class:`~firmware_agent.stages.batch.FrameBatch` in one compiled
pass. For each frame it reads the radio header (radiotap with extended presence bitmaps
and field alignment, Prism, AVS, PPI, or none for bare 802.11), the 802.11 frame control,
and for probe requests the transmitter address (addr2), the sequence number, the SSID
element's kind and a fingerprint of the elements that describe the device *model*.

Rows are kept for probe requests and for frames whose radio header cannot be read (then
nobody can tell what they are). Every other frame is only counted. Nothing here raises on
bad input and no read goes past a frame's captured length: a malformed frame becomes a
row whose ``kind`` says so, and the counting stage skips it.

``kind`` is a bit set:

========================  ======================================================
``KIND_PROBE``            frame control says probe request (type 0, subtype 4)
``KIND_MALFORMED``        radio header, 802.11 header or an element is truncated
``KIND_FCS_BAD``          the radio header says the FCS check failed
``KIND_NO_SA``            the frame ends before the transmitter address
========================  ======================================================

A row is a usable observation of a device exactly when ``kind == KIND_PROBE``.

The fingerprint is a 64-bit digest (unkeyed here; the anonymize stage keys it) of the
element order and the contents of supported/extended rates, HT, VHT, HE and EHT
capabilities, extended capabilities, and vendor elements' OUI and type. It never covers
the SSID, the channel (DS parameter set) or vendor element bodies (WPS carries a UUID).
Precisely: ``h = 0xCBF29CE484222325``; for each element but SSID (0) and DS parameter
set (3), in frame order, take ``n`` content bytes (all of elements 1, 45, 50, 127, 191
and of extension elements 255 whose first byte is 35 or 108; the first four of 221;
none of others), then ``h = mix(h, id | n << 8)`` and ``h = mix(h, w)`` for each 8-byte
little-endian word ``w`` of those bytes (the last one zero-padded), where
``mix(h, w) = g ^ (g >> 32)`` with ``g = (h ^ w) * 0x100000001B3 mod 2**64``.
"""

from __future__ import annotations

import sys

import numpy as np
from numpy.typing import NDArray

from firmware_agent.kernels import compiler_module, kernel
from firmware_agent.stages.batch import (
    KIND_FCS_BAD,
    KIND_MALFORMED,
    KIND_NO_SA,
    KIND_PROBE,
    LINKTYPE_AVS,
    LINKTYPE_IEEE802_11,
    LINKTYPE_PPI,
    LINKTYPE_PRISM,
    LINKTYPE_RADIOTAP,
    RSSI_MISSING,
    SSID_DIRECTED,
    SSID_NONE,
    SSID_WILDCARD,
    FrameBatch,
    ProbeBatch,
)

__all__ = [
    "parse_batch",
]


if sys.byteorder != "little":  # _load_u64le reads words in the machine's order
    raise ImportError("footfall's parser needs a little-endian machine (x86-64, arm64)")

_FP_SEED = np.uint64(0xCBF29CE484222325)
_FP_PRIME = np.uint64(0x100000001B3)

# Radiotap fields of the first presence word that precede what we read: (size, alignment)
# for bits 0..5: TSFT, Flags, Rate, Channel, FHSS, dBm antenna signal.
_RT_SIZE = np.array([8, 1, 1, 4, 2, 1], dtype=np.int64)
_RT_ALIGN = np.array([8, 1, 1, 2, 2, 1], dtype=np.int64)
_RT_FLAG_FCS = 0x10
_RT_FLAG_BADFCS = 0x40
_AVS_MAGIC_1 = 0x80211001
_AVS_MAGIC_2 = 0x80211002
_AVS_SSI_DBM = 2


@kernel(inline=True)
def _u16le(d: NDArray[np.uint8], p: int) -> int:
    return np.int64(d[p]) | (np.int64(d[p + 1]) << 8)


@kernel(inline=True)
def _u16be(d: NDArray[np.uint8], p: int) -> int:
    return (np.int64(d[p]) << 8) | np.int64(d[p + 1])


@kernel(inline=True)
def _u32le(d: NDArray[np.uint8], p: int) -> int:
    return _u16le(d, p) | (_u16le(d, p + 2) << 16)


@kernel(inline=True)
def _u32be(d: NDArray[np.uint8], p: int) -> int:
    return (
        (np.int64(d[p]) << 24)
        | (np.int64(d[p + 1]) << 16)
        | (np.int64(d[p + 2]) << 8)
        | np.int64(d[p + 3])
    )


@kernel(inline=True)
def _s8(v: int) -> int:
    return v - 256 if v >= 128 else v


@kernel(inline=True)
def _dbm32(v: int) -> int:
    """A 32-bit two's-complement signal as a row holds it: out of int16 range is missing."""
    if v >= 1 << 31:
        v -= 1 << 32
    return v if -32767 <= v <= 32767 else RSSI_MISSING


@kernel(inline=True)
def _channel_to_mhz(ch: int) -> int:
    """Centre frequency of a channel number given without a band (IEEE 802.11 Annex E)."""
    if 1 <= ch <= 13:
        return 2407 + 5 * ch
    if ch == 14:
        return 2484
    if 182 <= ch <= 196:  # the 4.9 GHz band
        return 4000 + 5 * ch
    if 32 <= ch <= 181:
        return 5000 + 5 * ch
    return 0


@kernel()
def _radiotap(d: NDArray[np.uint8], start: int, end: int) -> tuple[int, int, int, int]:
    """(header length or -1, flags, rssi, freq) of a radiotap header at d[start:end]."""
    if end - start < 8 or d[start] != 0:
        return -1, 0, RSSI_MISSING, 0
    it_len = _u16le(d, start + 2)
    if it_len < 8 or start + it_len > end:
        return -1, 0, RSSI_MISSING, 0
    hdr_end = start + it_len
    p = start + 4
    present = _u32le(d, p)
    word = present
    while word & 0x80000000:
        p += 4
        if p + 4 > hdr_end:
            return -1, 0, RSSI_MISSING, 0
        word = _u32le(d, p)
    pos = p + 4 - start
    flags = 0
    rssi = RSSI_MISSING
    freq = 0
    for bit in range(6):
        if not (present >> bit) & 1:
            continue
        align = _RT_ALIGN[bit]
        pos = (pos + align - 1) // align * align
        if start + pos + _RT_SIZE[bit] > hdr_end:
            return -1, 0, RSSI_MISSING, 0
        if bit == 1:
            flags = np.int64(d[start + pos])
        elif bit == 3:
            freq = _u16le(d, start + pos)
        elif bit == 5:
            rssi = _s8(np.int64(d[start + pos]))
        pos += _RT_SIZE[bit]
    return it_len, flags, rssi, freq


@kernel(inline=True)
def _u32(d: NDArray[np.uint8], p: int, big: bool) -> int:
    return _u32be(d, p) if big else _u32le(d, p)


@kernel()
def _prism(d: NDArray[np.uint8], start: int, end: int) -> tuple[int, int, int]:
    """(header length or -1, rssi, freq) of a Prism (wlan-ng) header, or of an AVS one.

    The msgcode (0x44, or 0x41 from other drivers) is in the capturing host's byte order,
    which it thereby tells. Items are ``did, status, len, data``; only exact DIDs count
    (channel 0x00030044 / 0x00003041, signal in dBm 0x00040044 / 0x00004041), and only
    with status 0. Linux drivers also wrote AVS headers under this link type.
    """
    if end - start >= 4 and _u32be(d, start) in (_AVS_MAGIC_1, _AVS_MAGIC_2):
        return _avs(d, start, end)
    if end - start < 8:
        return -1, RSSI_MISSING, 0
    if _u32le(d, start) in (0x44, 0x41):
        big = False
    elif _u32be(d, start) in (0x44, 0x41):
        big = True
    else:
        return -1, RSSI_MISSING, 0
    msglen = _u32(d, start + 4, big)
    if msglen < 24 or start + msglen > end:
        return -1, RSSI_MISSING, 0
    rssi = RSSI_MISSING
    freq = 0
    p = start + 24
    while p + 12 <= start + msglen:
        did = _u32(d, p, big)
        status = _u16be(d, p + 4) if big else _u16le(d, p + 4)
        value = _u32(d, p + 8, big)
        if status == 0:
            if did in (0x00030044, 0x00003041):
                freq = _channel_to_mhz(value)
            elif did in (0x00040044, 0x00004041):
                rssi = _dbm32(value)
        p += 12
    return msglen, rssi, freq


@kernel()
def _avs(d: NDArray[np.uint8], start: int, end: int) -> tuple[int, int, int]:
    """(header length or -1, rssi, freq) of an AVS (wlancap) header: big-endian."""
    if end - start < 64:
        return -1, RSSI_MISSING, 0
    length = _u32be(d, start + 4)
    if length < 64 or start + length > end:
        return -1, RSSI_MISSING, 0
    freq = _channel_to_mhz(_u32be(d, start + 28))
    rssi = _dbm32(_u32be(d, start + 48)) if _u32be(d, start + 44) == _AVS_SSI_DBM else RSSI_MISSING
    return length, rssi, freq


@kernel()
def _ppi(d: NDArray[np.uint8], start: int, end: int) -> tuple[int, int, int, int]:
    """(header length or -1, FCS flags as radiotap's, rssi, freq) of a PPI header.

    Fields are ``type, length, data``, padded to 32 bits after each one when header flag
    bit 0 says so. The 802.11-Common field (type 2) is exactly 20 bytes; its dBm signal
    of -128 means none.
    """
    if end - start < 8 or d[start] != 0:
        return -1, 0, RSSI_MISSING, 0
    aligned = d[start + 1] & 1
    length = _u16le(d, start + 2)
    if length < 8 or start + length > end or _u32le(d, start + 4) != LINKTYPE_IEEE802_11:
        return -1, 0, RSSI_MISSING, 0
    flags = 0
    rssi = RSSI_MISSING
    freq = 0
    off = 8
    while off + 4 <= length:
        ftype = _u16le(d, start + off)
        flen = _u16le(d, start + off + 2)
        data = start + off + 4
        if off + 4 + flen > length:
            return -1, 0, RSSI_MISSING, 0
        if ftype == 2 and flen == 20:
            common = _u16le(d, data + 8)
            flags = (_RT_FLAG_FCS if common & 1 else 0) | (_RT_FLAG_BADFCS if common & 4 else 0)
            freq = _u16le(d, data + 12)
            signal = _s8(np.int64(d[data + 18]))
            rssi = RSSI_MISSING if signal == -128 else signal
        off += 4 + flen
        if aligned:
            off = (off + 3) // 4 * 4
    return length, flags, rssi, freq


@kernel(inline=True)
def _mix(h: np.uint64, word: int) -> np.uint64:
    """One step of the fingerprint digest: h = (h ^ word) * P; h ^= h >> 32."""
    h = (h ^ np.uint64(word)) * _FP_PRIME
    return h ^ (h >> np.uint64(32))


def _element_tables() -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Per element id: shortest and longest valid length, bytes the fingerprint takes.

    The length rules are IEEE 802.11-2020's for the elements probe requests carry, the
    checks Wireshark applies too (its ``_ws.malformed``), so that a probe this parser calls
    malformed is one tshark calls malformed. Tables rather than branches: element ids
    vary frame to frame and a chain of comparisons costs a mispredicted branch or two each.
    """
    shortest = np.zeros(256, np.int64)
    longest = np.full(256, 255, np.int64)
    shortest[[1, 50, 127]] = 1  # rates, extended rates, extended capabilities
    shortest[[221, 150]] = 3  # vendor specific (and Cisco's): an OUI at least
    for eid, size in ((3, 1), (45, 26), (191, 12), (72, 1), (74, 14)):
        shortest[eid] = longest[eid] = size  # DS set, HT caps, VHT caps, 20/40, OBSS scan
    take = np.zeros(256, np.int64)
    take[[1, 45, 50, 127, 191]] = 255  # rates, HT/VHT capabilities, extended capabilities
    take[221] = 4  # vendor elements: OUI and type only (WPS carries a UUID)
    return shortest, longest, take


_SHORTEST, _LONGEST, _FP_TAKE = _element_tables()
_EXT_HE_CAPS = 35
_EXT_EHT_CAPS = 108
intrinsics = compiler_module("firmware_agent.kernels.intrinsics")


@kernel()
def _elements(d: NDArray[np.uint8], p: int, end: int) -> tuple[bool, int, np.uint64]:
    """Walk information elements in d[p:end]: (well formed, SSID kind, fingerprint)."""
    ssid = SSID_NONE
    h = _FP_SEED
    while p < end:
        if p + 2 > end:
            return False, ssid, h
        eid = np.int64(d[p])
        elen = np.int64(d[p + 1])
        body = p + 2
        if body + elen > end or elen < _SHORTEST[eid] or elen > _LONGEST[eid]:
            return False, ssid, h
        if eid == 0:
            if ssid == SSID_NONE:
                ssid = SSID_DIRECTED if elen > 0 else SSID_WILDCARD
        elif eid != 3:
            n = min(elen, _FP_TAKE[eid])
            if eid == 255 and elen >= 1 and (d[body] == _EXT_HE_CAPS or d[body] == _EXT_EHT_CAPS):
                n = elen
            h = _mix(h, eid | (n << 8))
            k = body
            stop = body + n
            while k + 8 <= stop:
                h = _mix(h, intrinsics.load_u64le(d, k))
                k += 8
            if k < stop:  # the 8 bytes ending at stop are in the frame: a header precedes
                tail: np.uint64 = intrinsics.load_u64le(d, stop - 8)
                h = _mix(h, tail >> np.uint64(8 * (8 - (stop - k))))
        p = body + elen
    return True, ssid, h


@kernel(
    export=(
        "i8(u1[:], i8[:], i4[:], i8[:], u2[:], u1[:], i8[:], u1[:, :], u2[:], i2[:], "
        "u2[:], u1[:], u8[:])"
    )
)
def _parse(
    data: NDArray[np.uint8],
    offsets: NDArray[np.int64],
    lengths: NDArray[np.int32],
    ts_ns: NDArray[np.int64],
    link_types: NDArray[np.uint16],
    kind: NDArray[np.uint8],
    out_ts: NDArray[np.int64],
    mac: NDArray[np.uint8],
    seq: NDArray[np.uint16],
    rssi_out: NDArray[np.int16],
    freq_out: NDArray[np.uint16],
    ssid_out: NDArray[np.uint8],
    fp_out: NDArray[np.uint64],
) -> int:
    rows = 0
    for i in range(offsets.shape[0]):
        start = offsets[i]
        end = start + lengths[i]
        lt = link_types[i]
        flags = 0
        rssi = RSSI_MISSING
        freq = 0
        if lt == LINKTYPE_RADIOTAP:
            hlen, flags, rssi, freq = _radiotap(data, start, end)
        elif lt == LINKTYPE_IEEE802_11:
            hlen = 0
        elif lt == LINKTYPE_PRISM:
            hlen, rssi, freq = _prism(data, start, end)
        elif lt == LINKTYPE_AVS:
            hlen, rssi, freq = _avs(data, start, end)
        elif lt == LINKTYPE_PPI:
            hlen, flags, rssi, freq = _ppi(data, start, end)
        else:
            hlen = -1
        s = start + hlen
        k = 0
        if hlen < 0 or end - s < 1:
            k = KIND_MALFORMED
        else:
            fc0 = np.int64(data[s])
            if fc0 != 0x40:
                continue
            k = KIND_PROBE
            body_end = end
            if flags & _RT_FLAG_FCS:
                body_end -= 4
            if flags & _RT_FLAG_BADFCS:
                k |= KIND_FCS_BAD
            hdr = 24
            if body_end - s >= 2 and data[s + 1] & 0x80:
                hdr = 28
            if body_end - s < 16:
                k |= KIND_MALFORMED | KIND_NO_SA
            elif body_end - s < hdr:
                k |= KIND_MALFORMED
        row = rows
        rows += 1
        kind[row] = k
        out_ts[row] = ts_ns[i]
        rssi_out[row] = rssi
        freq_out[row] = freq
        ssid_out[row] = SSID_NONE
        fp_out[row] = 0
        seq[row] = 0
        for b in range(6):
            mac[row, b] = 0
        if not k & KIND_PROBE or k & KIND_NO_SA:
            continue
        for b in range(6):
            mac[row, b] = data[s + 10 + b]
        if k & KIND_MALFORMED:
            continue
        seq[row] = _u16le(data, s + 22) >> 4
        ok, ssid, fp = _elements(data, s + hdr, body_end)
        ssid_out[row] = ssid
        if ok:
            fp_out[row] = fp
        else:
            kind[row] = k | KIND_MALFORMED
    return rows


def parse_batch(batch: FrameBatch) -> ProbeBatch:
    """Parse one frame batch into probe rows (never raises on frame contents)."""
    n = len(batch)
    kind = np.empty(n, np.uint8)
    ts = np.empty(n, np.int64)
    mac = np.empty((n, 6), np.uint8)
    seq = np.empty(n, np.uint16)
    rssi = np.empty(n, np.int16)
    freq = np.empty(n, np.uint16)
    ssid = np.empty(n, np.uint8)
    fp = np.empty(n, np.uint64)
    rows = _parse(
        np.ascontiguousarray(batch.data),  # _load_u64le reads raw memory: no strides
        batch.offsets,
        batch.lengths,
        batch.ts_ns,
        batch.link_types,
        kind,
        ts,
        mac,
        seq,
        rssi,
        freq,
        ssid,
        fp,
    )
    return ProbeBatch(
        kind=kind[:rows],
        ts_ns=ts[:rows],
        mac=mac[:rows],
        seq=seq[:rows],
        rssi=rssi[:rows],
        freq_mhz=freq[:rows],
        ssid=ssid[:rows],
        fp=fp[:rows],
        frames=n,
    )
