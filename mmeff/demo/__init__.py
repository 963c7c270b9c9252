"""The gradio demo (``mmeff demo``) and the plain comparison functions behind it."""
