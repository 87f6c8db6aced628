from host import *
run_case('block_size=7', 64, 2, 2, [(77, 277), (1, 300), (2, 9)], block_size=7, seed=11)
run_case('block_size=1', 64, 1, 2, [(70, 90), (1, 33)], block_size=1, seed=12)
run_case('block_size=64', 128, 1, 3, [(70, 200), (1, 129)], block_size=64, seed=13)
run_case('G=16 (MAX_GROUP)', 64, 1, 16, [(66, 70), (1, 200), (1, 1)], seed=14)
run_case('G=17 -> generic', 64, 1, 17, [(5, 70), (1, 200)], seed=15)
run_case('many decode, kvh=8 (splits small)', 64, 8, 1, [(1, c) for c in (1, 2, 17, 64, 65, 129, 500, 33, 999, 1000)], seed=16)
run_case('n_new=2 over long past', 128, 1, 7, [(2, 700), (1, 700)], seed=17)
