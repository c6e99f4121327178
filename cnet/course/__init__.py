"""What the notebooks call: the lessons' small experiments (:mod:`~cnet.course.lessons`), their
figures (:mod:`~cnet.course.plots`, :mod:`~cnet.course.training_plots`,
:mod:`~cnet.course.figures`), the ipywidgets explorers (:mod:`~cnet.course.widgets`) and the
U-Net's injection points (:mod:`~cnet.course.injection_points`). Nothing in the library imports
this layer."""
