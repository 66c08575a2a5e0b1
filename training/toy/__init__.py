"""The embedded default's world: synthetic captioned images and the toy reference model's pretraining."""
