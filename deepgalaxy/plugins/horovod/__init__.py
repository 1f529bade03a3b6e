"""Horovod launcher plugin: runs N training ranks with ``horovodrun --gloo`` (see ``scripts/build_horovod.sh``)."""
