"""The Flowgate plugin SDK for Python (componentize-py); `arrow` is its Arrow IPC codec."""
