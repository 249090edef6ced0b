"""The `make train` demo runs and prints the notes' worked examples."""
from cnn_jax import demo


def test_demo_report():
  report = demo.run()
  assert '18   20   21   14   16' in report           # seed 004, first row
  assert '0   30   30    0' in report                 # seed 002 edge
  assert '6    8    8' in report                      # seed 004 6x6 max-pool, first row
  assert 'W1=227 F=11 S=4 P=0 -> 55' in report
  assert 'All gradient checks passed' in report
