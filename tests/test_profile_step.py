"""benchmarks/profile_step.py's trace arithmetic (no profiling run here: the
parsing is what could silently misattribute time)."""
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    'profile_step', os.path.join(REPO, 'benchmarks', 'profile_step.py'))
profile_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_step)


def _ev(name, ts, dur, tid=1):
  return {'name': name, 'ph': 'X', 'pid': 7, 'tid': tid, 'ts': ts, 'dur': dur}


def test_exclusive_times_subtract_nested_events_per_thread():
  events = [
      _ev('while.3', 0, 100),              # contains two fusions and a nested loop
      _ev('fusion.1', 10, 20),
      _ev('while.4', 40, 50),
      _ev('ynn_fusion.2', 45, 30),         # inside while.4
      _ev('fusion.1', 95, 5),              # at the very end of while.3
      _ev('fusion.1', 10, 60, tid=2),      # another thread: not nested in while.3
      _ev('copy', 200, 7),                 # after everything
  ]
  times = profile_step.exclusive_times(events)
  assert times == {'while.3': 100 - 20 - 50 - 5, 'fusion.1': 20 + 5 + 60,
                   'while.4': 50 - 30, 'ynn_fusion.2': 30, 'copy': 7}
  # Nothing is counted twice: exclusive times add up to the covered time.
  assert sum(times.values()) == 100 + 60 + 7


def test_kinds_drop_suffixes_and_bookkeeping():
  times = {'ynn_fusion.12': 5.0, 'ynn_fusion': 1.0, 'select_dynamic-update-slice_fusion.17': 2.0,
           'wrapped_copy.3.1': 4.0, 'ThunkExecutor::Execute': 50.0,
           'SlinkyThreadPool::Await': 9.0, 'end: ynn_fusion': 3.0}
  assert profile_step.by_kind(times) == [('ynn_fusion', 6.0), ('wrapped_copy', 4.0),
                                         ('select_dynamic-update-slice_fusion', 2.0)]


def test_hlo_op_names_map_instructions_to_layers():
  hlo = '''
  %ynn_fusion.44 = f32[16,4096]{1,0} fusion(%a, %b), kind=kCustom, calls=%c, metadata={op_name="jit(train_step)/jvp(VGG)/fc1/dot_general" stack_frame_id=113}
  %copy.3 = f32[4]{0} copy(%x)
  ROOT %wrapped_copy.3 = f32[32,16]{1,0} fusion(%t), kind=kLoop, metadata={op_name="jit(train_step)/stage1/conv1/while" stack_frame_id=1}
  '''
  names = profile_step.hlo_op_names(hlo)
  assert names == {'ynn_fusion.44': 'jit(train_step)/jvp(VGG)/fc1/dot_general',
                   'wrapped_copy.3': 'jit(train_step)/stage1/conv1/while'}
