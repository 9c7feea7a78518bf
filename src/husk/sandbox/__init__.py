"""Provisioning: sandboxes, boot templates, the warm pool and the accelerator choice.

Sits between the runtime (containers) and the VM layer, which it reaches only
through the protocols of :mod:`husk.vm.machine` and an injected backend
(:class:`husk.sandbox.provisioner.Provisioner`).
"""
