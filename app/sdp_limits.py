"""What a signalling request may carry, checked before anything parses it.

A body is read only up to its route's limit (a ``Content-Length`` above it is refused unread), and
an SDP offer is refused when it has more lines, media sections or candidates than a real client
sends: aiortc's cost grows with each (about half a millisecond of event-loop time per media
section), and a 99 KB offer of 1,100 sections held the loop for 2 s. The scan here is one pass of
``str.splitlines`` and costs well under a millisecond at the byte limit.

What real clients send, for the headroom: the page's offer from Chromium (camera and the
control channel) has 2 media sections, a few dozen candidates even on a machine with many
interfaces, and a few hundred lines with every codec it offers; OBS's WHIP offer has 2 sections
(video, audio); aiortc's with video, audio and a channel has 3 sections, 6 candidates and 84 lines.
"""

from __future__ import annotations

from starlette.requests import Request

from app.webrtc import MAX_SDP_BYTES, OfferError

#: media (``m=``) sections: a browser sends a handful (camera, audio, data), OBS two
MAX_MEDIA_SECTIONS = 8
#: ``a=candidate`` lines in all sections together: a browser sends a few per interface; each is probed
#: with STUN checks, so an offer naming hundreds would make the server spray packets at them
MAX_CANDIDATES = 40
#: lines of the whole offer: a browser's, every codec listed, is a few hundred
MAX_SDP_LINES = 1500


class BodyTooLarge(ValueError):
    """The request body is over its route's limit (HTTP 413); no more of it was read."""


def media_type(request: Request) -> str:
    """The request's ``Content-Type`` without parameters, lower-cased (``""`` when absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or :class:`BodyTooLarge` as soon as it is known to pass ``limit`` bytes.

    A ``Content-Length`` over the limit is refused before any of the body is read; a streamed
    (chunked) body is read no further than the chunk that would pass the limit.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > len(str(limit)) or int(declared) > limit):
        raise BodyTooLarge(f"the request body ({declared} bytes) is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise BodyTooLarge(f"the request body is larger than {limit} bytes")
        body += chunk
    return bytes(body)


def check_sdp_shape(sdp: str) -> None:
    """Refuse (:class:`OfferError`) an SDP that no real client would send, before aiortc parses it."""
    try:
        size = len(sdp.encode("utf-8"))
    except UnicodeEncodeError:
        raise OfferError("the SDP is not valid UTF-8 text") from None
    _at_most(size, MAX_SDP_BYTES, "bytes")
    lines = sdp.splitlines()
    _at_most(len(lines), MAX_SDP_LINES, "lines")  # first: it bounds the two scans below
    _at_most(sum(line.startswith("m=") for line in lines), MAX_MEDIA_SECTIONS, "media sections")
    _at_most(sum(line.startswith("a=candidate") for line in lines), MAX_CANDIDATES, "candidates")


def _at_most(count: int, most: int, what: str) -> None:
    if count > most:
        raise OfferError(f"the SDP has {count} {what}; a real client sends at most {most}")


__all__ = ["MAX_CANDIDATES", "MAX_MEDIA_SECTIONS", "MAX_SDP_LINES", "BodyTooLarge", "check_sdp_shape", "read_body"]
