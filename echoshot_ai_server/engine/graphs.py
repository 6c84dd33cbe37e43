"""Small batches replayed as CUDA graphs.

The fused engine launches about 350 kernels per forward pass, each prepared in Python. For a batch
of small frames that costs the CPU more time than the kernels cost the GPU (4 frames of 176x144:
about 40 ms of launches for about 15 ms of GPU work), so the GPU waits. Such batches are captured
once per input shape as a CUDA graph and replayed with a single launch. Larger batches are launched
as they are: there the GPU is the bottleneck, and a graph would keep its working memory (thousands
of bytes per pixel) for as long as it lives.

All graphs share one memory pool, so together they hold about what the largest of them needs. That
is safe because they are replayed one at a time and each result is copied out before the next replay.
"""

import logging
import threading
from collections import OrderedDict
from typing import Callable

import torch

log = logging.getLogger(__name__)

# Batches of at most this many input pixels are replayed as graphs: below it the kernels' launches,
# not the GPU, set the pace (4 frames of 320x240; BENCHMARKS.md). Their shared pool then takes about
# this many pixels' worth of the engine's working memory (tiling.BYTES_PER_INPUT_PIXEL each).
GRAPH_MAX_PIXELS = 4 * 320 * 240
GRAPHS_KEPT = 8  # the least recently used graph goes beyond this many input shapes


# One side stream per device for every capture: PyTorch's allocator hands a block of the graphs'
# shared pool only to allocations on the stream it was allocated on, so captures on different streams
# would each grow the pool instead of sharing it (`torch.cuda.graph` keeps one stream for that reason).
_capture_streams: dict[torch.device, torch.cuda.Stream] = {}


def capture_cuda_graph(forward: Callable[[torch.Tensor], torch.Tensor], static_input: torch.Tensor, pool):
    """Capture `forward(static_input)` as a CUDA graph: (replay, its output tensor).

    Captured on a side stream, as `torch.cuda.graph` does, but without its preparations: it
    synchronises the device and empties PyTorch's memory caches before every capture, which costs a
    new shape tens of milliseconds and every later batch of other shapes its cached memory. Callers
    capture one at a time (`GraphedForward` holds its lock)."""
    device = static_input.device
    stream = _capture_streams.get(device)
    if stream is None:
        stream = _capture_streams[device] = torch.cuda.Stream(device)
    graph = torch.cuda.CUDAGraph()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # thread-local: a call another thread makes meanwhile (the worker's own, not the GPU's work) is no error
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            output = forward(static_input)
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    return graph.replay, output


class GraphedForward:
    """`forward` with small input shapes replayed as CUDA graphs (see the module's docstring).

    A shape's first batch runs as it is, and its graph is captured right after it; every later batch of
    that shape is replayed. The first run matters: cuDNN (the head's convolution) sets up a shape it
    has not seen by allocating memory of its own, which a capture forbids, so a capture at a shape's
    first batch fails on some machines. A failed capture leaves PyTorch's allocator recording into the
    graphs' pool, after which every capture fails: from the first failure on, nothing more is captured
    and every batch runs as it is. `capture` is the capturing function (CUDA graphs; tests pass their own)."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], *, max_pixels: int = GRAPH_MAX_PIXELS,
                 keep: int = GRAPHS_KEPT, capture=capture_cuda_graph, bypass: Callable[[], bool] = lambda: False):
        """`bypass`: while it returns True, every batch runs as it is (the warm-up's dry pass)."""
        self.forward, self.max_pixels, self.keep = forward, max_pixels, keep
        self.capture, self.bypass = capture, bypass
        self.seen: set = set()
        self.broken = False  # a capture failed: none is tried again
        self.graphs: OrderedDict = OrderedDict()  # key -> (static input, replay, output)
        self.pool = None
        self.lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if n * h * w > self.max_pixels or self.broken or self.bypass():
            return self.forward(x)
        key = (tuple(x.shape), x.stride(), x.dtype, x.device)
        with self.lock:
            entry = self.graphs.get(key)
            if entry is None:
                if key not in self.seen:  # its first batch: as it is, captured right after
                    self.seen.add(key)
                    out = self.forward(x)
                    self._capture(key, x)
                    return out
                entry = self._capture(key, x)  # a shape evicted earlier has run before: captured at once
                if entry is None:
                    return self.forward(x)
            else:
                self.graphs.move_to_end(key)
            static_input, replay, output = entry
            static_input.copy_(x)
            replay()
            return output.clone()

    def _capture(self, key, x: torch.Tensor):
        if self.pool is None and x.device.type == "cuda":
            self.pool = torch.cuda.graph_pool_handle()
        static_input = x.clone()
        try:
            replay, output = self.capture(self.forward, static_input, self.pool)
        except Exception:  # the batch is as right without a graph, only slower
            log.warning("capturing a CUDA graph for input %s failed; from now on every batch runs without one",
                        tuple(x.shape), exc_info=True)
            self.broken = True
            return None
        if len(self.graphs) >= self.keep:
            self.graphs.popitem(last=False)
        self.graphs[key] = (static_input, replay, output)
        return self.graphs[key]
