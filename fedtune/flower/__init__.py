"""The thin Flower layer: strategy, population, replies, the round loop, the apps.

Importing the package loads the model stack (transformers, peft) once, here. Flower's
simulation runtime imports the ServerApp in one thread while it imports the ClientApp in
another, and two threads resolving transformers' lazy attributes at the same time can
each find the other's module half-initialised ("cannot import name
'AutoModelForCausalLM' from 'transformers'"). Both apps live in this package, so the
package's own import lock lets one thread load the stack while the other waits.
"""

import fedtune.model.cache  # noqa: F401  (the stack: peft, transformers; see above)
