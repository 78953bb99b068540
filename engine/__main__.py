import sys

from vllm_gateway.engine.main import main

if __name__ == "__main__":
    sys.exit(main())
