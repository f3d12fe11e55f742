"""The xDS control plane (ADS) for stock gRPC ``xds:///`` clients; needs the optional ``xds-protos`` package
(only :mod:`.stream` and :mod:`.resources` import it)."""

#: Most resource names one ADS stream may subscribe to by default (``--xds-max-names``/``LB_XDS_MAX_NAMES``).
MAX_NAMES = 256
