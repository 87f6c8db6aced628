from host import *
import sys
batch = [(130, 130), (77, 277), (1, 1), (1, 63), (1, 300), (1, 1000), (2, 2), (65, 100), (64, 64)]
res = []
for D in (64, 128):
    for G in (1, 2, 7):
        res.append(run_case(f'mixed', D, 2, G, batch, seed=D + G))
# peaky softmax (large q), decode-only batch, prefill-only batch
run_case('peaky q*4', 128, 2, 7, batch, qscale=4.0, seed=5)
run_case('decode only', 128, 1, 2, [(1, 1), (1, 63), (1, 300), (1, 1000)], seed=6)
run_case('decode only single short', 64, 2, 1, [(1, 1)], seed=7)
run_case('prefill only, past=63', 64, 1, 7, [(3, 66), (129, 129)], seed=8)
# generic path
run_case('generic path', 64, 2, 7, batch, path='generic', seed=9)
run_case('generic D=96 (auto->generic)', 96, 2, 2, [(77, 277), (1, 300), (5, 5)], seed=10)
