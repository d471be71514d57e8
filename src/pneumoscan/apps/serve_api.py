"""What the HTTP API says about its model and its answers: the model's description (`describe_model`),
the pydantic models of the OpenAPI document (`api_models`) and the request body and answers of
POST /api/predict (`predict_openapi`).
"""

# no `from __future__ import annotations`: pydantic must see the real types of the models' fields

import functools
import os
from typing import Any

from .. import __version__
from ..tasks.predict import Predictor

DISCLAIMER = "Research tool, not a medical device: not for diagnosis or treatment decisions."




def describe_model(predictor: Predictor, checkpoint_name: str, validation: dict[str, Any] | None = None) -> dict[str, Any]:
    """What /api/model and every prediction response say about the model (a file name, never a local path)."""
    cfg = predictor.config
    return {"name": cfg.model.name, "activation": cfg.model.activation, "recipe": cfg.recipe,
            "checkpoint": os.path.basename(checkpoint_name), "pneumoscan_version": __version__,
            "class_names": predictor.class_names, "threshold": predictor.threshold,
            "threshold_interval": predictor.output.threshold_interval,
            "calibration": predictor.output.describe()["calibration"], "assumed_prevalence": predictor.output.prior_used,
            "prevalence_source": predictor.output.source, "train_prevalence": predictor.output.train_prevalence,
            "model_prior": predictor.output.model_prior,
            "ood_threshold": None if predictor.ood is None else predictor.ood.threshold,
            "image_size": cfg.preprocessing.image_size, "ensemble": predictor.ensemble or None,
            "adaptation": predictor.adaptation, "validation": validation, "disclaimer": DISCLAIMER}


@functools.cache
def model_info_model() -> Any:
    """The pydantic model of what `describe_model` says (/api/model, and every prediction's `model`)."""
    from pydantic import BaseModel, Field

    class Validation(BaseModel):
        split: str
        n: int | None = Field(description="images scored, or null for the checkpoint's own validation record")
        accuracy: float | None = None
        precision: float | None = Field(None, description="null when the model called nothing pneumonia")
        recall: float | None = None
        specificity: float | None = None
        f1: float | None = None
        roc_auc: float | None = None

    class ModelInfo(BaseModel):
        name: str
        activation: str
        recipe: str
        checkpoint: str = Field(description="the checkpoint's file name")
        pneumoscan_version: str
        class_names: list[str]
        threshold: float = Field(description="label the image pneumonia at or above this probability (at "
                                             "`assumed_prevalence`)")
        threshold_interval: list[float] | None = Field(
            description="95% bootstrap interval of the threshold chosen on validation (calibrated scale, model "
                        "prior); null for the fixed rule or a checkpoint that does not record one")
        calibration: dict[str, Any] = Field(description="method ('none', 'temperature' or 'platt'), temperature "
                                                             "and offset: reported = sigmoid(logit / temperature + offset)")
        assumed_prevalence: float | None = Field(
            description="the share of pneumonia among the images that probabilities assume by default (Bayes' prior); "
                        "null when the checkpoint does not record its training prevalence")
        prevalence_source: str = Field(description="'model': the model's own prior; 'given': the server's --prevalence; "
                                                    "'adapted': the site's prevalence recorded by `pneumoscan adapt`")
        train_prevalence: float | None = Field(description="pneumonia fraction of the training split, if known")
        model_prior: float | None = Field(description="the prior the calibrated probabilities refer to (0.5 when "
                                                      "training balanced the classes)")
        ood_threshold: float | None = Field(description="an image whose `ood_score` is at or above this is outside "
                                                        "what the model was trained on; null without a detector")
        image_size: int
        ensemble: str | None = Field(description="an ensemble's members (seeds) and test-time views; null for one model")
        adaptation: dict[str, Any] | None = Field(
            None, description="a checkpoint fitted to a site by `pneumoscan adapt`: images, BatchNorm, the site's "
                              "prevalence, its interval and whether to trust it, labelled rows and the expected rates; "
                              "null when not adapted")
        validation: Validation | None = Field(description="validation figures; an undefined one is null")
        disclaimer: str

    return ModelInfo


@functools.cache
def api_models() -> Any:
    """The pydantic models that the OpenAPI document gives for each answer."""
    from types import SimpleNamespace

    from pydantic import BaseModel, Field

    ModelInfo = model_info_model()

    class FileResult(BaseModel):
        filename: str = Field(description="the uploaded file's name, shown only")
        p_pneumonia: float | None = Field(ge=0, le=1, description="the probability of pneumonia, at "
                                                                  "`assumed_prevalence`; null when the file could not be read")
        label: str | None = Field(description="PNEUMONIA when `p_pneumonia` is at or above `threshold` (three-class "
                                              "models: then the likelier type); null for an unreadable file")
        threshold: float = Field(description="the decision threshold for `p_pneumonia`")
        class_names: list[str]
        model: str
        heatmap_png: str | None = Field(description="the Grad-CAM overlay as a base64 PNG (at most 512 px), or null")
        probabilities: dict[str, float] | None = Field(description="per class (three-class models), else null")
        warnings: list[str] = Field(description="what about the image may make the answer less reliable: what its "
                                    "DICOM header says the model was not trained for (a lateral view, another body "
                                    "part or modality, an adult, colour, bits, field of view), then its size")
        error: str | None = Field(description="why the file could not be read, or null")
        assumed_prevalence: float | None = Field(description="the share of pneumonia among the images that "
                                                             "`p_pneumonia` assumes (Bayes' prior)")
        prevalence_source: str = Field(description="'model' (the model's own prior), 'given' (the server's "
                                                   "--prevalence or this request's `prevalence`)")
        ood_score: float | None = Field(ge=0, description="Mahalanobis distance of the image's features to the "
                                                          "training split's; null without a detector, for an "
                                                          "unreadable file, or when infinite (flagged)")
        ood_threshold: float | None = Field(description="the score at or above which an image is flagged; null "
                                                        "without a detector")
        outside_training: bool | None = Field(description="true: the image is outside what this model was trained "
                                                          "on (its probability means little); null without a detector")

    class PredictResponse(BaseModel):
        results: list[FileResult]
        model: ModelInfo

    class Problem(BaseModel):
        detail: str

    class ValidationProblem(BaseModel):
        detail: list[dict[str, Any]]

    class Health(BaseModel):
        status: str = Field(description="'ok', or why the inference worker stopped")

    return SimpleNamespace(ModelInfo=ModelInfo, FileResult=FileResult, PredictResponse=PredictResponse, Problem=Problem,
                           ValidationProblem=ValidationProblem, Health=Health)


def predict_openapi(max_files: int) -> tuple[dict, dict]:
    """The request body and the answers of POST /api/predict, for the OpenAPI document."""
    m = api_models()
    body = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"], "properties": {"files": {
            "type": "array", "minItems": 1, "maxItems": max_files, "items": {"type": "string", "format": "binary"},
            "description": "the images: JPEG, PNG or DICOM, one part each"}}}}}}}
    retry = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
    answers = {
        400: {"model": m.Problem, "description": "a malformed multipart body, no file in `files`, or too many files"},
        401: {"model": m.Problem, "description": "a token is set and the request does not carry it"},
        403: {"model": m.Problem, "description": "a cross-site request from a browser"},
        408: {"model": m.Problem, "description": "the body did not arrive in time"},
        413: {"model": m.Problem, "description": "the body is over the upload limit"},
        415: {"model": m.Problem, "description": "the body is not multipart/form-data"},
        422: {"model": m.PredictResponse | m.ValidationProblem,
              "description": "every file was unreadable (each result gives its reason), or a bad query parameter"},
        503: {"model": m.Problem, "headers": retry,
              "description": "busy (all decoding slots taken) or the inference worker stopped; retry later"},
    }
    return body, answers
