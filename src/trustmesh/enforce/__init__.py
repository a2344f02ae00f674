"""NetworkPolicy enforcement with the Linux kernel.

:mod:`trustmesh.enforce.nft` compiles a cluster model into nftables rulesets
(pure); :mod:`trustmesh.enforce.netns` runs the pods of a cluster as network
namespaces on one host, loads those rulesets and probes real connectivity (IO).
"""

__all__: list[str] = []
