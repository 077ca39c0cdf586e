from llmcli.eval.plot import sparkline


def test_sparkline_follows_the_values():
    assert sparkline([3.0, 2.0, 1.0, 1.0]) == "█▅▁▁"
    assert sparkline([]) == ""
    assert sparkline([2.0] * 5) == "▁▁▁▁▁"  # flat: no division by zero
    falling = sparkline([100 - i for i in range(1000)], width=40)
    assert len(falling) == 40 and falling[0] == "█" and falling[-1] == "▁"
    assert list(falling) == sorted(falling, reverse=True)
