from lctrain.cli import main
from lctrain.process_exit import leave

if __name__ == "__main__":
    leave(main())
