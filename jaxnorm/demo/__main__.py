"""``python -m jaxnorm.demo``: see ``jaxnorm.demo``."""

from jaxnorm.demo.run import main

if __name__ == "__main__":
    main()
