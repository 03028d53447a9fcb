"""The certified pass over the training rows: what every evaluation of D* runs on.

* ``partial``: the one accumulator (online softmax, weighted sum, top K) and its merges.
* ``bounds``: every rounding-error bound, and the shares of the tolerance.
* ``precision``: ``certify`` (coarse pass -> DENSE / RESCORED / EXACT), the exact re-score.
* ``dispatch``: the backend registry; backends declare their limits as data.
* ``rows``: row sources (all rows or one class), resident or streamed in blocks.
* ``prefetch``: the background reader of streamed blocks.
* ``backends/``: torch (float64), cpu (optden._C), triton and cuda (fp32 GPU kernels) and
  ``gpu_pass``, the host side the GPU backends share.
"""
