"""Library code of the SSD sample: conversion, backends, pre/post-processing."""
