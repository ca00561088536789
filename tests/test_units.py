from atlasfl.units import mib


def test_mib_keeps_small_budgets_readable():
    assert mib(3 * 2**30) == "3072 MiB"
    assert mib(10 * 2**20) == "10 MiB"
    assert mib(1.55 * 2**20) == "1.6 MiB"
    assert mib(0.4 * 2**20) == "409.6 KiB"  # not "0 MiB"
