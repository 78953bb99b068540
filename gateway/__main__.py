import sys

from vllm_gateway.gateway.cli import main

if __name__ == "__main__":
    sys.exit(main())
