"""``python -m esr_deploy.cli``: the same as the ``esr-deploy`` console script."""

from esr_deploy.cli import main

main()
