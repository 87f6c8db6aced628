#!/usr/bin/env python3
"""Compile kernel files with NVRTC the way src/backend/cuda/nvrtc.rs does (common.cuh prepended,
same options) and print ptxas' resource report: registers, spills, shared memory per function.
Needs no GPU and no cargo build: libnvrtc and the CUDA headers come from the wheels protege
installs into ~/.cache/protege/cuda/py (or $PROTEGE_NVRTC_DIR / $PROTEGE_CUDA_INCLUDE).

    python3 tools/emulate_attention/nvrtc_compile.py flash_attn_train [more names...]   # default: every kernels/*.cu
"""
import ctypes, os, sys, glob, re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = os.path.expanduser('~/.cache/protege/cuda/py/nvidia')
LIB = os.environ.get('PROTEGE_NVRTC_DIR', os.path.join(PY, 'cuda_nvrtc/lib'))
INC = os.environ.get('PROTEGE_CUDA_INCLUDE', os.path.join(PY, 'cuda_runtime/include'))

nvrtc = ctypes.CDLL(os.path.join(LIB, 'libnvrtc.so.12'))
nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p

def check(rc, what):
    if rc != 0:
        raise RuntimeError(f'{what}: {nvrtc.nvrtcGetErrorString(rc).decode()}')

def compile_file(name, arch):
    common = open(os.path.join(ROOT, 'crates/engine/kernels/common.cuh')).read()
    src = open(os.path.join(ROOT, f'crates/engine/kernels/{name}.cu')).read()
    full = f'{common}\n#line 1 "{name}.cu"\n{src}'.encode()
    prog = ctypes.c_void_p()
    check(nvrtc.nvrtcCreateProgram(ctypes.byref(prog), full, f'{name}.cu'.encode(), 0, None, None), 'create')
    opts = [f'--gpu-architecture={arch}', '--std=c++17', '--fmad=true', '-default-device', '-lineinfo',
            '--ptxas-options=-v', f'--include-path={INC}']
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode()

def main():
    names = sys.argv[1:] or sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, 'crates/engine/kernels/*.cu')))
    ok = True
    for arch in ('sm_80', 'sm_90'):
        for name in names:
            rc, log = compile_file(name, arch)
            func = None
            for line in log.splitlines():
                m = re.search(r"Compiling entry function '(\w+)'", line)
                if m:
                    func = m.group(1)
                elif 'registers' in line or 'spill' in line:
                    print(f'{arch} {name} {func}: {line.strip()}')
                    if re.search(r'[1-9]\d* bytes spill', line):
                        ok = False
                elif line.strip() and 'ptxas info' not in line:
                    print(f'{arch} {name}: {line}')
            if rc != 0:
                print(f'{arch} {name}: COMPILE FAILED'); ok = False
    print('OK' if ok else 'FAILED (errors or spills)')
    sys.exit(0 if ok else 1)

if __name__ == '__main__':
    main()
