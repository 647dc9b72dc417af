"""Bias audit and mitigation: CrowS-Pairs and minimal pairs, template probes, data
statistics, counterfactual data augmentation (see each module's docstring)."""
