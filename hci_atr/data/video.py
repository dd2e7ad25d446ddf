"""Video frames for the image captioner: which timestamps to caption for a clip, and decoding them with PyAV.

A clip is a window of a video (AudioCaps: ``start_time`` plus the clip's length). :func:`frame_times` spreads the
frames to caption over that window, :func:`video_seconds` says how long the video is (to clamp the window) and
:func:`read_frames` decodes the frames nearest to the chosen times as RGB arrays.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def frame_times(start: float | None, clip_seconds: float, num_frames: int,
                video_seconds: float | None = None) -> list[float]:
    """Timestamps (seconds) of the frames to caption for one clip.

    The window ``[start, start + clip_seconds]`` is clamped to ``[0, video_seconds]`` and cut into ``num_frames``
    equal parts; the result is the centre of each part, in increasing order. ``start`` None/NaN means 0.
    Raises ValueError when the start lies past the end of the video.
    """
    s = 0.0 if start is None or (isinstance(start, float) and math.isnan(start)) else max(0.0, float(start))
    e = s + float(clip_seconds)
    if video_seconds is not None and video_seconds > 0:
        if s >= video_seconds:
            raise ValueError(f"start_time {s:.2f} s is past the end of the video ({video_seconds:.2f} s)")
        e = min(e, float(video_seconds))
    step = (e - s) / num_frames
    return [s + (i + 0.5) * step for i in range(num_frames)]


def read_frames(path: str, times: Sequence[float]) -> list[tuple[float, np.ndarray]]:
    """Decode the frames nearest to ``times`` (sorted seconds) from a video file with PyAV.

    Returns ``[(frame_time, rgb uint8 [H, W, 3])]``, one per requested time: the first frame whose presentation
    time reaches the target minus half a frame period; targets past the last frame get the last frame.
    Seeks once to the keyframe before the first target, then decodes forward (clips are short, so one forward pass
    is cheaper than one seek per frame).
    """
    import av

    out: list[tuple[float, np.ndarray]] = []
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("file has no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate) if stream.average_rate else 25.0
        half = 0.5 / rate
        if times and times[0] > 1.0 and stream.time_base is not None:
            container.seek(int(max(0.0, times[0] - 1.0) / stream.time_base), stream=stream, backward=True)
        last = None
        k = 0
        for frame in container.decode(stream):
            t = float(frame.time) if frame.time is not None else 0.0
            while k < len(times) and t + half >= times[k]:
                out.append((t, frame.to_ndarray(format="rgb24")))
                k += 1
            last = frame
            if k == len(times):
                break
        if last is None:
            raise ValueError("no frame could be decoded")
        while k < len(times):
            lt = float(last.time) if last.time is not None else 0.0
            out.append((lt, last.to_ndarray(format="rgb24")))
            k += 1
    return out


def video_seconds(path: str) -> float | None:
    """The video stream's length in seconds (None when the container does not say)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0] if container.streams.video else None
        if stream is not None and stream.duration and stream.time_base:
            return float(stream.duration * stream.time_base)
        if container.duration:
            return container.duration / 1_000_000
    return None
