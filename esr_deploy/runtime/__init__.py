"""The torch-free runtime half of esr-deploy: what a serving process needs to open a bundle.

For now it holds the one bundle reader (:mod:`esr_deploy.runtime.bundle_reader`), through
which every command and :func:`esr_deploy.load` open a bundle.
"""
