"""Data parallelism: one step function, run under jit over a device mesh or under pmap.

'jit' (default): a 1-D ``Mesh`` over the devices with axis 'data'; the batch is
  sharded along it (``NamedSharding(mesh, P('data'))``), the TrainState is
  replicated (``P()``), and XLA inserts the gradient all-reduce. Means in the loss
  and BatchNorm statistics are over the global batch, exactly as on one device.
'pmap': the same step under ``jax.pmap(axis_name='batch')``; the step pmeans
  gradients, metrics and BN running statistics, and models built with
  ``axis_name='batch'`` compute BatchNorm moments across devices and draw dropout
  masks by global example index (cnn_jax.nn.Dropout), so both modes agree.

Multi-host: ``initialize_distributed`` calls ``jax.distributed.initialize``; every
process feeds only its rows of each global batch (cnn_jax.data.make_loader with
process_index/process_count), assembled into one global array by
``jax.make_array_from_process_local_data`` (jit) or split over the local devices
(pmap).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
PMAP_AXIS = 'batch'


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """jax.distributed.initialize, auto-detected (TPU pods, SLURM) when args are None."""
  kwargs = {}
  if coordinator_address is not None:
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  jax.distributed.initialize(**kwargs)


def select_devices(num_devices: Optional[int] = None) -> list:
  """The first num_devices global devices (all when None), checked."""
  devices = jax.devices()
  if num_devices is None:
    return devices
  if num_devices > len(devices):
    raise ValueError(f'config num_devices={num_devices} but only {len(devices)} devices '
                     f'are visible ({devices[0].platform}); on CPU set XLA_FLAGS='
                     f'--xla_force_host_platform_device_count={num_devices}.')
  if jax.process_count() > 1 and num_devices != len(devices):
    raise ValueError('num_devices must be None (all devices) in a multi-process run.')
  return devices[:num_devices]


class Parallel:
  """Places states and batches for one parallelism mode and wraps step functions.

  Args:
    mode: 'jit' or 'pmap'.
    devices: the devices to use (global list; pmap uses this process's ones).
  """

  def __init__(self, mode: str, devices: Sequence[Any]):
    if mode not in ('jit', 'pmap'):
      raise ValueError(f"parallelism must be 'jit' or 'pmap', got {mode!r}.")
    self.mode = mode
    self.devices = list(devices)
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    self.mesh = Mesh(np.asarray(self.devices), (DATA_AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
    self.axis_name = PMAP_AXIS if mode == 'pmap' else None

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  def check_batch_size(self, batch_size: int, name: str = 'batch_size') -> None:
    if batch_size % self.num_devices:
      raise ValueError(
          f'config {name}={batch_size} is not divisible by the {self.num_devices} '
          f'devices used for data parallelism; choose a multiple of {self.num_devices} '
          f'(e.g. {max(1, batch_size // self.num_devices) * self.num_devices}) or set '
          'num_devices.')

  def put_state(self, state):
    """Host (or single-device) state -> replicated over the devices."""
    if self.mode == 'jit':
      return jax.device_put(state, self.replicated)
    # pmap shards a leading axis of host arrays over its devices on the first call.
    n = len(self.local_devices)
    return jax.tree_util.tree_map(
        lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), state)

  def get_state(self, state):
    """Replicated state -> host NumPy pytree (one copy)."""
    if self.mode == 'pmap':
      state = jax.tree_util.tree_map(lambda x: x[0], state)
    return jax.device_get(state)

  def put_batch(self, batch):
    """This process's rows of a global batch -> the step's input layout."""
    if self.mode == 'jit':
      return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
              for k, v in batch.items()}
    n = len(self.local_devices)
    return {k: np.asarray(v).reshape((n, -1) + np.shape(v)[1:]) for k, v in batch.items()}

  def wrap(self, fn, *, donate_state: bool):
    """fn(state, batch) -> jit over the mesh, or pmap over the local devices."""
    donate = (0,) if donate_state else ()
    if self.mode == 'jit':
      return jax.jit(fn, in_shardings=(self.replicated, self.batch_sharding),
                     out_shardings=(self.replicated, self.replicated) if donate_state
                     else self.replicated, donate_argnums=donate)
    return jax.pmap(fn, axis_name=PMAP_AXIS, devices=self.local_devices,
                    donate_argnums=donate)

  def unreplicate_metrics(self, metrics):
    """Metrics from a step -> host floats/arrays (first replica under pmap)."""
    if self.mode == 'pmap':
      metrics = jax.tree_util.tree_map(lambda x: x[0], metrics)
    return jax.device_get(metrics)
