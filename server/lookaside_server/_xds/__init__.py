"""The xDS control plane for stock ``xds:///`` clients: the ADS stream and the Envoy resources it serves."""
