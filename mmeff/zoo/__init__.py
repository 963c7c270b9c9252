"""The synthetic world and the small trained models shipped with mmeff."""
