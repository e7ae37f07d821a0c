"""The napari plugin (npe2; extra `[napari]`): Denoise layer, Live raw | denoised view, Micro-Manager attach.

A thin edge: the widgets call `fm2s_stream.denoise_stack`, `adapters.zmq.PreviewSubscriber` and
`adapters.mmcore.MMCoreSource`; the manifest is `napari.yaml`, registered through the `napari.manifest`
entry point. `fm2s-stream view` opens napari with the Live widget connected.
"""
