"""Emulates kernels/flash_attn_train.cu (forward, pre, backward, dq cast) lane by lane and compares
out, lse, dq, dk, dv with a float64 reference of the CPU train_fwd / train_bwd.
    python3 run_train.py            # the cases below (a few minutes)
    python3 run_train.py --quick    # one small case
    python3 run_train.py --teeth    # deliberate fragment bugs: the errors must become large
"""
import sys
import emu
from host import *

LENGTHS = [1, 5, 63, 64, 65, 130, 200]
if '--teeth' in sys.argv:
    for m in ('fwd_swap_q', 'bwd_swap_ds', 'bwd_dq_notrans'):
        emu.MUTATE.clear(); emu.MUTATE.add(m)
        run_train_case(f'MUTATED {m}', 64, 1, 2, [5, 70], seed=3)
    emu.MUTATE.clear()
    run_train_case('unmutated', 64, 1, 2, [5, 70], seed=3)
    sys.exit(0)
if '--quick' in sys.argv:
    run_train_case('quick', 64, 1, 2, [5, 70], seed=3)
    sys.exit(0)
bad = False
for D in (64, 128):
    for kvh, G in ((2, 1), (2, 2), (2, 7)):
        rel, nan, issues = run_train_case('packed 1,5,63,64,65,130,200', D, kvh, G, LENGTHS, seed=D + G)
        bad |= nan > 0 or bool(issues) or max(rel.values()) > 2e-2
rel, nan, issues = run_train_case('peaky q*4, 7:1', 128, 1, 7, [129, 3, 64], seed=5, qscale=4.0)
bad |= nan > 0 or bool(issues) or max(rel.values()) > 2e-2
# sub-tile (16 at D=128) and tile boundaries; single-row sequences (their dq, dk are 0 exactly)
for nm, D, kvh, G, lens in (('sub-tile edges', 128, 1, 2, [16, 17, 31, 32, 33, 128]),
                            ('tile edges', 64, 3, 1, [127, 128, 129, 192]),
                            ('single rows', 64, 1, 3, [1, 2, 1])):
    rel, nan, issues = run_train_case(nm, D, kvh, G, lens, seed=D + len(lens))
    bad |= nan > 0 or bool(issues) or max(rel.values()) > 2e-2
print('FAILED' if bad else 'all within bf16 tolerance, no issues')
