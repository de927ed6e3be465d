from adloop.cores import free_cores, usable_cores


def test_free_cores_leave_out_the_ones_other_work_keeps_busy() -> None:
    n = usable_cores()
    assert free_cores(load=0.0) == n
    assert free_cores(load=1.2) == max(1, n - 1)


def test_free_cores_never_drop_below_one() -> None:
    assert free_cores(load=10_000.0) == 1
    assert free_cores(load=-5.0) == usable_cores()
