import sys
from pdserve.entrypoints.api_server import run_vllm_serve
if __name__ == '__main__':
    run_vllm_serve(sys.argv[1:])
