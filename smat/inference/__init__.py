"""Using a meta-tuned model: load a run or an export, specialise it to a task from a few examples, predict,
export the packed deployment form.

    model = smat.load("runs/builtin")                       # best checkpoint (or an export folder)
    specialist = model.specialize(images, labels)           # one merge, class prototypes
    specialist.predict(new_images).labels                   # class names; .probabilities [Q, n_way]
    specialist.to_timm()                                     # plain timm nn.Module with the task's weights
    specialist.save("bolts"); smat.load_specialist("bolts")
"""

from .export import ExportReport, PackedModel, export_run
from .loading import Model, load
from .specialist import Predictions, Specialist, load_specialist

__all__ = ["ExportReport", "Model", "PackedModel", "Predictions", "Specialist", "export_run", "load",
           "load_specialist"]
