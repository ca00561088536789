"""ATLAS on Flower (``pip install atlasfl[flower]``): the same round loop, over the Message API.

``server_app`` holds the ServerApp and ``run_flower_simulation``, ``client_app`` the ClientApp,
``executor`` the Flower executor, ``records`` the message <-> record conversion.
"""
