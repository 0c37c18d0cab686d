"""Loading: what esr-deploy reads from a user before compiling, none of it executed.

- :mod:`.unpickler`: the restricted unpickler for checkpoints that torch's ``weights_only``
  loader refuses (its ``find_class`` never imports anything);
- :mod:`.checkpoint`: reading a checkpoint file and finding its state dict;
- :mod:`.keys`: wrapper prefixes removed, keys and shapes matched strictly against an
  architecture, near misses scored;
- :mod:`.detect`: which architecture a checkpoint is (the zoo's recipes, then spandrel's
  detection, then the user's ``--arch`` callable) and the loaded model;
- :mod:`.spandrel` and :mod:`.user_code`: the two front ends for architectures esr-deploy
  does not ship.
"""
