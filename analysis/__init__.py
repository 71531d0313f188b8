"""Pure numerics and plotting on stored results: no Prefect, no file writes."""
