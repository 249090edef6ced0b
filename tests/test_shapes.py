"""Shape rules: W2 = (W1 - F + 2P)/S + 1 with dilation, and padding resolution."""
import pytest

from cnn_jax.ops import output_size, resolve_padding


@pytest.mark.parametrize('n,f,s,p,d,expected', [
    (5, 3, 1, 0, 1, 3), (5, 3, 2, 0, 1, 2), (5, 3, 3, 0, 1, 1),   # seed 004 exercises
    (6, 3, 1, 0, 1, 4),                                            # seed 002 question 1
    (6, 3, 1, 1, 1, 6),                                            # 6x6 -> 8x8 -> 6x6
    (39, 3, 1, 0, 1, 37),                                          # seed 002 "37"
    (227, 11, 4, 0, 1, 55), (55, 3, 2, 0, 1, 27), (27, 5, 1, 2, 1, 27),  # AlexNet
    (32, 5, 1, 0, 1, 28), (28, 2, 2, 0, 1, 14),                    # LeNet-5 C1, S2
    (7, 3, 1, 0, 2, 3),                                            # dilation 2: F_eff 5
    (8, 3, 2, (0, 1), 1, 4),
])
def test_output_size(n, f, s, p, d, expected):
  assert output_size(n, f, s, p, d) == expected


def test_output_size_padding_modes():
  assert output_size(5, 3, padding='SAME') == 5
  assert output_size(5, 3, stride=2, padding='SAME') == 3      # ceil(5 / 2)
  assert output_size(5, 3, padding='FULL') == 7
  assert output_size(5, 3, padding='VALID') == 3


def test_resolve_padding():
  assert resolve_padding('SAME', (6, 7), (3, 4), (2, 1), (1, 1)) == ((0, 1), (1, 2))
  assert resolve_padding('FULL', (5,), (3,), (1,), (2,)) == ((4, 4),)
  assert resolve_padding(2, (5, 5), (3, 3), (1, 1), (1, 1)) == ((2, 2), (2, 2))
  assert resolve_padding([1, (0, 2)], (5, 5), (3, 3), (1, 1), (1, 1)) == ((1, 1), (0, 2))


@pytest.mark.parametrize('args,match', [
    ((3, 5), r'window of 5 .* larger than the padded input 3'),
    ((5, 3, 0), r'stride must be >= 1'),
    ((5, 0), r'kernel size must be >= 1'),
    ((5, 3, 1, 0, 0), r'dilation must be >= 1'),
    ((5, 3, 1, 'HALF'), r'padding must be one of'),
    ((5, 3, 1, -2), r'padding must be >= 0'),
])
def test_output_size_errors(args, match):
  with pytest.raises(ValueError, match=match):
    output_size(*args)
